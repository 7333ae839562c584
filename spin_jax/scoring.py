"""Teacher-forced scoring: summed response log-probs of packed batches under a model.

This is the forward that SPIN's loss, the opponent's stored log-probs and `spin-jax score` share.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from spin_jax import loss as loss_lib
from spin_jax import sharding
from spin_jax.data import tokenize
from spin_jax.data.tokenize import SpinBatch
from spin_jax.model import transformer


def response_hidden(params, cfg, batch: SpinBatch):
    """Hidden states [gN, R, D] from which each response token is predicted (the prompt's last
    position for token 0, response position t for t + 1), each prompt computed once for all its
    responses; and the output matrix in their dtype."""
    w_out = transformer.output_embedding(params, cfg)
    tokens = batch.tokens
    # The last response token is never an input that matters: only logits of earlier positions are used.
    hp, hidden = transformer.forward_shared_prefix(
        params, cfg, batch.prompt_tokens, batch.prompt_positions, batch.prompt_valid,
        tokens[:, :-1], batch.positions[:, :-1], batch.valid[:, :-1])
    hidden = jnp.concatenate([jnp.repeat(hp[:, -1:], batch.group, axis=0), hidden], axis=1)  # [gN, R, D]
    return hidden, w_out.astype(hidden.dtype)


def batch_logps(params, cfg, batch: SpinBatch, vocab_chunk: int = 0):
    """Summed fp32 log-probs [gN] of the response tokens of a grouped batch, each prompt computed
    once for all its responses."""
    hidden, w_out = response_hidden(params, cfg, batch)
    tok_logps = loss_lib.token_logps_chunked(hidden, w_out, batch.tokens, vocab_chunk,
                                             unroll=cfg.unroll_loops, cap=cfg.final_softcap)
    return jnp.sum(jnp.where(batch.valid, tok_logps, 0.0), axis=-1)


def batch_logps_greedy(params, cfg, batch: SpinBatch, vocab_chunk: int = 0):
    """(summed fp32 log-probs [gN], is_greedy [gN]): is_greedy is whether every response token is
    the model's most likely one at its position (lm-eval's loglikelihood)."""
    hidden, w_out = response_hidden(params, cfg, batch)
    tok_logps, best = loss_lib.token_logps_and_argmax(hidden, w_out, batch.tokens, vocab_chunk,
                                                      unroll=cfg.unroll_loops, cap=cfg.final_softcap)
    return (jnp.sum(jnp.where(batch.valid, tok_logps, 0.0), axis=-1),
            jnp.all((best == batch.tokens) | ~batch.valid, axis=-1))


def grouped_shardings(mesh, rows: int, group: int = 1, leading=(), with_logps: bool = False) -> SpinBatch:
    """Shardings of a grouped batch of `rows` responses and rows // group prompts: the batch axis
    over (data, fsdp) where it divides, after `leading` replicated axes (training's micro-batch
    axis). With `with_logps`, opponent_logps shards like the responses."""
    def spec(n, ndim):
        inner = sharding.batch_sharding(mesh, ndim, n).spec
        return sharding.NamedSharding(mesh, sharding.P(*leading, *inner))

    prompt, response = spec(rows // group, 2), spec(rows, 2)
    return SpinBatch(prompt_tokens=prompt, prompt_valid=prompt, prompt_positions=prompt, tokens=response,
                     valid=response, positions=response, opponent_logps=spec(rows, 1) if with_logps else None)


def logps_fn(cfg, mesh, vocab_chunk: int, rows: int, group: int = 1, greedy: bool = False):
    """jit(batch_logps) with the params sharded by the rule table and grouped batches of `rows`
    responses (`group` per prompt) over (data, fsdp): `score`, the opponent's stored log-probs
    (group 2) and `evaluate` all score through it. greedy: jit(batch_logps_greedy) (`benchmark`)."""
    fn = batch_logps_greedy if greedy else batch_logps
    out = sharding.batch_sharding(mesh, 1, rows)
    return jax.jit(sharding.traced_on(mesh, lambda p, b: fn(p, cfg, b, vocab_chunk)),
                   in_shardings=(transformer.param_shardings(cfg, mesh), grouped_shardings(mesh, rows, group)),
                   out_shardings=(out, out) if greedy else out)


def score_rows(model, rows: list[dict], batch_size: int = 8, max_length: int | None = None,
               vocab_chunk: int = 0, mesh=None, progress: bool = True, where=None) -> Iterator[dict]:
    """Yield each row with "logp" and "n_tokens" added, in input order. A row longer than
    max_length tokens (default: the model's max_position_embeddings) is an error naming where[i]
    (default "row i")."""
    max_length = max_length or model.cfg.max_position_embeddings
    mesh = mesh or sharding.make_mesh()
    params = transformer.shard_params(model.params, model.cfg, mesh)
    fn = logps_fn(model.cfg, mesh, vocab_chunk, batch_size)
    tok = model.tokenizer
    prompts = [tokenize.prompt_ids(tok, r["prompt"]) for r in rows]
    responses = [tokenize.response_ids(tok, r["response"]) for r in rows]
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if len(p) + len(r) > max_length:
            raise ValueError(f"{where[i] if where else f'row {i}'}: prompt + response is {len(p) + len(r)} "
                             f"tokens, over --max-length {max_length}; shorten the row")
    logps = logps_in_batches(fn, params, prompts, responses, batch_size, tok.pad_token_id or 0, mesh,
                             progress, desc="score")
    for row, lp, r in zip(rows, logps, responses):
        yield {**row, "logp": float(lp), "n_tokens": len(r)}


def logps_in_batches(fn, params, prompts: list[list[int]], responses: list[list[int]], rows: int,
                     pad_id: int, mesh, progress: bool = True, desc: str = "score",
                     group: int = 1) -> np.ndarray:
    """fn(params, packed) [rows] for each response, `rows` responses at a time, in the grouped
    layout (data.tokenize.pack_grouped): response j continues prompt j // group. The last batch is
    padded with copies of its first group (fixed shape); prompt and response lengths are bucketed
    per batch as training packs them. Returns float64 [len(responses)] in input order."""
    from tqdm import tqdm

    if len(responses) != group * len(prompts) or rows % group:
        raise ValueError(f"{len(responses)} responses, {len(prompts)} prompts, {rows} rows: "
                         f"need group {group} responses per prompt and rows a multiple of it")
    per = rows // group  # prompts per batch
    in_sharding = grouped_shardings(mesh, rows, group)
    out = []
    for start in tqdm(range(0, len(prompts), per), desc=desc, unit="batch", disable=not progress):
        p, r = prompts[start:start + per], responses[start * group:(start + per) * group]
        n = len(r)
        p, r = p + [p[0]] * (per - len(p)), r + r[:group] * (per - len(p))
        packed = tokenize.pack_grouped(p, r, tokenize.bucket(max(map(len, p))), tokenize.bucket(max(map(len, r))),
                                       pad_id)
        # placed explicitly: with several processes, jit refuses sharded numpy inputs
        out.extend(np.asarray(fn(params, jax.device_put(packed, in_sharding)))[:n].tolist())
    return np.asarray(out, np.float64)


def pair_logps(fn, params, encoded, rows: int, pad_id: int, mesh, progress: bool = True,
               desc: str = "score pairs") -> np.ndarray:
    """(logp real, logp generated) [N, 2] of SPIN examples (data.examples.Encoded), encoded as
    training encodes them and each prompt computed once for both responses; fn is
    logps_fn(..., rows, group=2)."""
    prompts = [list(e.prompt) for e in encoded]
    responses = [list(x) for e in encoded for x in (e.real, e.generated)]  # side by side, as training
    return logps_in_batches(fn, params, prompts, responses, rows, pad_id, mesh, progress, desc,
                            group=2).reshape(-1, 2)


def read_jsonl(path: str, required: Iterable[str], lines: list | None = None) -> list[dict]:
    """Rows of a JSONL file; a bad line is an error naming the file, line and field. With `lines`,
    each row's line number is appended to it (for errors that name the row)."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; expected a JSONL file")
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                if not isinstance(row.get(key), str):
                    what = "missing" if key not in row else f"a {type(row[key]).__name__}, not a string"
                    raise ValueError(f"{path}:{n}: field {key!r} is {what}")
            rows.append(row)
            if lines is not None:
                lines.append(n)
    return rows
