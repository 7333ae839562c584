"""Teacher-forced scoring: summed response log-probs of packed batches under a model.

This is the forward that SPIN's loss, the opponent's stored log-probs and `spin-jax score` share.
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from spin_jax import loss as loss_lib
from spin_jax.data import tokenize
from spin_jax.model import llama


def batch_logps(params, cfg, batch, vocab_chunk: int = 0):
    """Summed fp32 log-probs [N] of the response tokens of a packed batch (see data.tokenize)."""
    hidden, _ = llama.forward_hidden(params, cfg, batch["tokens"], batch["positions"], batch["valid"])
    w_out = llama.output_embedding(params, cfg).astype(hidden.dtype)
    tok_logps = loss_lib.token_logps_chunked(hidden, w_out, batch["labels"], vocab_chunk)
    return jnp.sum(jnp.where(batch["loss_mask"], tok_logps, 0.0), axis=-1)


def score_rows(model, rows: list[dict], batch_size: int = 8, max_length: int = 2048,
               vocab_chunk: int = 0, mesh=None, progress: bool = True) -> Iterator[dict]:
    """Yield each row with "logp" and "n_tokens" added, in input order."""
    from spin_jax import sharding

    mesh = mesh or sharding.make_mesh()
    params, param_sh = sharding.shard_params(model.params, model.cfg, mesh)
    in_sh = sharding.batch_sharding(mesh, 2, batch_size)
    fn = jax.jit(lambda p, b: batch_logps(p, model.cfg, b, vocab_chunk),
                 in_shardings=(param_sh, in_sh), out_shardings=sharding.batch_sharding(mesh, 1, batch_size))
    tok = model.tokenizer
    prompts = [tokenize.prompt_ids(tok, r["prompt"]) for r in rows]
    responses = [tokenize.response_ids(tok, r["response"]) for r in rows]
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if len(p) + len(r) > max_length:
            raise ValueError(f"row {i}: prompt + response is {len(p) + len(r)} tokens, "
                             f"over --max-length {max_length}; raise it or shorten the row")
    logps = logps_in_batches(fn, params, prompts, responses, batch_size, tok.pad_token_id or 0, in_sh,
                             progress, desc="score")
    for row, lp, r in zip(rows, logps, responses):
        yield {**row, "logp": float(lp), "n_tokens": len(r)}


def logps_in_batches(fn, params, prompts: list[list[int]], responses: list[list[int]], rows: int,
                     pad_id: int, in_sharding, progress: bool = True, desc: str = "score") -> np.ndarray:
    """fn(params, packed) [rows] for each (prompt, response), `rows` at a time: the last batch is
    padded with copies of its first pair (fixed shape), prompt and response lengths bucketed per
    batch as training packs them. Returns float64 [N] in input order."""
    from tqdm import tqdm

    out = []
    for start in tqdm(range(0, len(prompts), rows), desc=desc, unit="batch", disable=not progress):
        p, r = prompts[start:start + rows], responses[start:start + rows]
        n = len(p)
        p, r = p + [p[0]] * (rows - n), r + [r[0]] * (rows - n)
        packed = tokenize.pack(p, r, tokenize.bucket(max(map(len, p))), tokenize.bucket(max(map(len, r))), pad_id)
        # placed explicitly: with several processes, jit refuses sharded numpy inputs
        out.extend(np.asarray(fn(params, jax.device_put(packed, in_sharding)))[:n].tolist())
    return np.asarray(out, np.float64)


def read_jsonl(path: str, required: Iterable[str]) -> list[dict]:
    """Rows of a JSONL file; a bad line is an error naming the file, line and field."""
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
    return rows
