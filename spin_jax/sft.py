"""Supervised fine-tuning (SFT) through SPIN's training machinery: θ0 from a base model, and the
paper's baseline of more SFT from θt.

    spin-jax sft --config C                       # runs/<run>/sft/model (θ0 with model.init: sft)
    spin-jax sft --config C --init iter1           # runs/<run>/sft_from_iter1/model: SFT from θ1 with as
                                                   # many updates as SPIN iteration 1 took (or --updates N)

The step is `train.train_step` with `SftObjective`: the mean token NLL over the supervised tokens
of the whole global batch (token sum over token count, across micro-batches and hosts), on the
same Trainer (checkpoints, resume, the NaN guard, metrics.jsonl, TensorBoard and W&B), the rule
table's layouts, remat and LoRA.

Conversations (`encode_conversation`) go through the tokenizer's chat template turn by turn: the
template's text before each assistant turn, then the turn's text and its end-of-turn token, so a
first turn is tokenized exactly as SPIN's prompt (`tokenize.prompt_ids`) and response
(`tokenize.response_ids`). sft.loss_on picks the supervised tokens: every assistant turn and its
end-of-turn token (assistant), or every token (all, the recipe of zephyr-7b-sft-full).

A batch (`SftBatch`, [N, T] each) holds one conversation per row, or with sft.packing several,
each a segment: segment ids 1, 2, ... (0 is padding), positions restarting at 0 per segment and
block-diagonal causal attention (`transformer.forward_hidden`'s `segments`), so the loss of a
packed batch equals the loss of the same conversations unpacked.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from spin_jax import loss as loss_lib
from spin_jax import rundir, sharding, tracking
from spin_jax.config import Config
from spin_jax.data import tokenize
from spin_jax.model import transformer

log = logging.getLogger(__name__)


class SftDataError(ValueError):
    """The conversations give nothing to train on (counts and the key to change in the message)."""


# ----------------------------------------------------------------------------------------------
# Conversations -> tokens and the loss mask


class TemplateMismatch(ValueError):
    """The chat template renders a conversation's prefix differently from the whole (so turns
    cannot be cut apart), or ends no assistant turn with the end-of-turn token."""


def encode_conversation(tokenizer, messages: Sequence[dict], loss_on: str = "assistant",
                        max_length: Optional[int] = None, first_turn_only: bool = False):
    """(ids, mask) of a conversation: `mask[i]` says token i is supervised. Turns after the last
    assistant turn are dropped (nothing to learn there); with `max_length`, so are the turns that
    would end past it. None when not one assistant turn is left (no assistant turn at all, or the
    first one already ends past max_length)."""
    eot = tokenize.end_of_turn_id(tokenizer)
    eot_text = tokenizer.convert_ids_to_tokens(eot)

    def render(msgs, gen):
        return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=gen)

    def ids_of(text):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    ids: list[int] = []
    mask: list[bool] = []
    done, kept = "", None  # text rendered so far; (ids, mask) through the last whole turn that fits
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        prefix = render(messages[:k], True)
        if not prefix.startswith(done):
            raise TemplateMismatch(f"the template renders the conversation before turn {k} differently "
                                   "from the conversation so far")
        context = ids_of(prefix[len(done):])
        turn = render(messages[:k + 1], False)
        if not turn.startswith(prefix):
            raise TemplateMismatch(f"turn {k}: the template renders an assistant turn that does not follow "
                                   "its own generation prompt")
        end = turn.find(eot_text, len(prefix))
        if end < 0:
            raise TemplateMismatch(f"turn {k}: the template ends no assistant turn with the end-of-turn "
                                   f"token {eot_text!r}")
        answer = ids_of(turn[len(prefix):end]) + [eot]
        ids += context + answer
        mask += [False] * len(context) + [True] * len(answer)
        done = turn[:end + len(eot_text)]
        if max_length is not None and len(ids) > max_length:
            break
        kept = (list(ids), list(mask))
        if first_turn_only:
            break
    if kept is None:
        return None
    ids, mask = kept
    return ids, ([True] * len(ids) if loss_on == "all" else mask)


def encode_conversations(tokenizer, rows: Sequence[dict], *, loss_on: str, max_length: int, first_turn_only: bool,
                         where: str, progress: bool = True) -> list[tuple[list[int], list[bool]]]:
    """The encoded conversations of `rows` (each with "messages"); rows that keep no assistant turn
    are skipped, counted and reported. Nothing left, or no supervised token, is an SftDataError
    naming the counts and the key to change."""
    from tqdm import tqdm

    out, too_long, no_answer, bad = [], 0, 0, []
    for i, row in enumerate(tqdm(rows, desc="tokenize conversations", unit="conv", leave=False,
                                 disable=not progress or jax.process_index() != 0 or len(rows) < 200)):
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]},
                                           {"role": "assistant", "content": row["response"]}]
        if not any(m.get("role") == "assistant" for m in messages):
            no_answer += 1
            continue
        try:
            enc = encode_conversation(tokenizer, messages, loss_on, max_length, first_turn_only)
        except TemplateMismatch as e:
            bad.append(f"{where} row {i} (id {row.get('id')!r}): {e}")
            continue
        except Exception as e:  # the template's own checks (e.g. roles that do not alternate)
            bad.append(f"{where} row {i} (id {row.get('id')!r}): the chat template rejects it ({e})")
            continue
        if enc is None:
            too_long += 1
            continue
        out.append(enc)
    if bad:
        log.warning(f"{where}: skipped {len(bad)} conversations the chat template cannot split into turns; "
                    f"the first: {bad[0]}")
    if too_long or no_answer:
        log.info(f"{where}: skipped {too_long} conversations whose first assistant turn ends past "
                 f"max_length={max_length} tokens and {no_answer} with no assistant turn")
    if not out:
        raise SftDataError(
            f"{where}: none of {len(rows)} conversations is left to train on ({too_long} end their first "
            f"assistant turn past {max_length} tokens, {no_answer} have no assistant turn, {len(bad)} do not "
            "fit the chat template); raise sft.max_length (or data.max_length), or check data.name")
    return out


# ----------------------------------------------------------------------------------------------
# Batches


@struct.dataclass
class SftBatch:
    """Rows of tokens [N, T], each one conversation or (packed) several. Training adds a leading
    micro-batch axis to every field (`microbatches`)."""
    tokens: Any  # [N, T] int32
    positions: Any  # [N, T] int32, restarting at 0 in each segment
    segments: Any  # [N, T] int32: 1, 2, ... per conversation in the row, 0 on padding
    targets: Any  # [N, T] bool: token t is supervised (predicted from position t - 1 of its segment)

    def microbatches(self, n: int) -> "SftBatch":
        rows = self.tokens.shape[0]
        if n <= 0 or rows % n:
            raise ValueError(f"a batch of {rows} rows does not split into {n} micro-batches "
                             "(sft.grad_accum must divide the rows per host)")
        return jax.tree.map(lambda v: np.asarray(v).reshape(n, v.shape[0] // n, *v.shape[1:]), self)


def row_plan(lengths: Sequence[int], order: Sequence[int], row_length: int, packing: bool) -> list[list[int]]:
    """The conversations of each row, in `order`: one per row, or packed (next fit: a row takes the
    next conversations until the next one would overflow `row_length`)."""
    if not packing:
        return [[int(i)] for i in order]
    rows, row, used = [], [], 0
    for i in order:
        n = lengths[i]
        if row and used + n > row_length:
            rows.append(row)
            row, used = [], 0
        row.append(int(i))
        used += n
    if row:
        rows.append(row)
    return rows


def make_rows(encoded: Sequence[tuple[list[int], list[bool]]], plan: Sequence[list[int]], width: int,
              pad_id: int = 0) -> SftBatch:
    """The SftBatch of rows `plan` (lists of indices into `encoded`), each `width` tokens wide."""
    n = len(plan)
    tokens = np.full((n, width), pad_id, np.int32)
    positions = np.zeros((n, width), np.int32)
    segments = np.zeros((n, width), np.int32)
    targets = np.zeros((n, width), bool)
    for r, members in enumerate(plan):
        at = 0
        for s, i in enumerate(members, start=1):
            ids, mask = encoded[i]
            k = len(ids)
            if at + k > width:
                raise ValueError(f"row {r}: {at + k} tokens exceed the row's {width}")
            tokens[r, at:at + k] = ids
            positions[r, at:at + k] = np.arange(k)
            segments[r, at:at + k] = s
            targets[r, at + 1:at + k] = mask[1:]  # a segment's first token has nothing to predict it
            at += k
    return SftBatch(tokens=tokens, positions=positions, segments=segments, targets=targets)


@dataclasses.dataclass
class Schedule:
    """Every update's global rows, fixed before training (so a resumed run reads the same batches):
    epochs of the conversations in a seeded order, packed or not, cut into global batches (the
    remainder of each epoch dropped), for `epochs` epochs, or for exactly `updates` updates
    (epochs repeat as needed)."""
    encoded: Sequence[tuple[list[int], list[bool]]]
    row_length: int
    packing: bool
    global_batch_size: int
    seed: int
    epochs: int = 1
    updates: Optional[int] = None

    def __post_init__(self):
        lengths = [len(ids) for ids, _ in self.encoded]
        self.batches: list[list[list[int]]] = []
        epoch = 0
        while (self.updates is None and epoch < self.epochs) or \
                (self.updates is not None and len(self.batches) < self.updates):
            order = np.random.default_rng([self.seed, epoch]).permutation(len(lengths))
            plan = row_plan(lengths, order, self.row_length, self.packing)
            full = len(plan) // self.global_batch_size
            if full == 0:
                raise SftDataError(
                    f"{len(lengths)} conversations make {len(plan)} rows, not one full batch of "
                    f"sft.global_batch_size={self.global_batch_size}; lower sft.global_batch_size or raise "
                    "sft.num_conversations")
            self.batches += [plan[k * self.global_batch_size:(k + 1) * self.global_batch_size] for k in range(full)]
            epoch += 1
        if self.updates is not None:
            del self.batches[self.updates:]
        self.epochs_read = epoch

    @property
    def steps(self) -> int:
        return len(self.batches)

    def host_batches(self, start: int, process_index: int = 0, process_count: int = 1,
                     pad_id: int = 0, min_bucket: int = 16) -> Iterator[SftBatch]:
        """This host's rows of each global batch from update `start`: host h takes rows
        [h*G/H, (h+1)*G/H). Rows are as wide as the batch's longest, in a power-of-two bucket."""
        if self.global_batch_size % process_count:
            raise ValueError(f"sft.global_batch_size={self.global_batch_size} does not split over {process_count} "
                             f"hosts: use a multiple of {process_count}")
        local = self.global_batch_size // process_count
        for plan in self.batches[start:]:
            used = max(sum(len(self.encoded[i][0]) for i in members) for members in plan)
            width = tokenize.bucket(used, min_bucket, max(self.row_length, min_bucket))
            mine = plan[process_index * local:(process_index + 1) * local]
            yield make_rows(self.encoded, mine, width, pad_id)


# ----------------------------------------------------------------------------------------------
# The objective


def token_nll(params, cfg, batch: SftBatch, vocab_chunk: int = 0):
    """(summed NLL of the supervised tokens, their count) of a batch: one forward, block-diagonal
    attention over the segments, log-probs `vocab_chunk` vocab columns at a time."""
    hidden, _ = transformer.forward_hidden(params, cfg, batch.tokens, batch.positions, segments=batch.segments)
    w_out = transformer.output_embedding(params, cfg).astype(hidden.dtype)
    logps = loss_lib.token_logps_chunked(hidden[:, :-1], w_out, batch.tokens[:, 1:], vocab_chunk,
                                         unroll=cfg.unroll_loops, cap=cfg.final_softcap)
    mask = batch.targets[:, 1:] & (batch.segments[:, 1:] == batch.segments[:, :-1])
    return -jnp.sum(jnp.where(mask, logps, 0.0)), jnp.sum(mask)


class SftObjective:
    """`train.train_step`'s objective for SFT: the token-mean NLL over the supervised tokens of the
    whole update (every micro-batch's NLL sum over the update's token count)."""

    postfix = (("loss", "loss", ".4f"), ("supervised_tokens", "tokens", ".0f"))
    uses_opponent = False

    def __init__(self, cfg, tcfg):
        self.cfg, self.tcfg = cfg, tcfg

    def normaliser(self, batch: SftBatch):
        """The update's supervised token count (at least 1)."""
        supervised = batch.targets[..., 1:] & (batch.segments[..., 1:] == batch.segments[..., :-1])
        return jnp.maximum(jnp.sum(supervised), 1).astype(jnp.float32)

    def micro_loss(self, params, opponent_params, micro: SftBatch, count):
        nll, _ = token_nll(params, self.cfg, micro, self.tcfg.vocab_chunk)
        return nll / count, {"supervised_tokens": count}

    def shardings(self, mesh) -> SftBatch:
        axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
        sh = sharding.NamedSharding(mesh, sharding.P(None, axes if len(axes) > 1 else (axes[0] if axes else None)))
        return SftBatch(tokens=sh, positions=sh, segments=sh, targets=sh)

    def host_batch(self, batch: SftBatch) -> SftBatch:
        return batch


# ----------------------------------------------------------------------------------------------
# Untrained special tokens

UNTRAINED_CLUSTER = 32  # a token whose embedding this many other tokens share (cosine > 0.98) is untrained
END_OF_TEXT = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>")  # a base model's end-of-document token


def fix_untrained_tokens(params: dict, cfg, tokenizer, encoded) -> list[str]:
    """Start the special tokens the conversations use (a chat template's turn markers) from a trained
    embedding where a base model left them untrained, i.e. where a token's embedding is shared (cosine
    > 0.98) by at least UNTRAINED_CLUSTER other tokens, as a base model's unused and chat tokens are.
    Otherwise SFT raises every token of the cluster with it: a base Gemma 3 then puts the probability
    of ending its turn on thousands of <unusedN> tokens. The end-of-turn token starts as the base
    model's end-of-document token (<eos>, </s>, ...: the end it already predicts), any other as the
    mean of the embeddings outside the cluster (Unsloth's fix_untrained_tokens); the input embedding
    and, when untied, the output column. Changes `params` in place; returns the tokens changed."""
    eot = tokenize.end_of_turn_id(tokenizer)
    special = set(tokenizer.all_special_ids) | {eot}
    used = sorted({t for ids, _ in encoded for t in ids} & special)
    embed = np.asarray(params["embed"], np.float32)
    head = np.asarray(params["lm_head"], np.float32) if "lm_head" in params else None
    norms = np.linalg.norm(embed, axis=1) + 1e-12

    def cluster_of(t):
        return (embed @ (embed[t] / norms[t])) / norms > 0.98

    vocab = tokenizer.get_vocab()
    ends = [vocab[n] for n in END_OF_TEXT if n in vocab and vocab[n] != eot]
    end = next((e for e in ends if cluster_of(e).sum() - 1 < UNTRAINED_CLUSTER), None)
    changed = []
    for t in used:
        cluster = cluster_of(t)
        if cluster.sum() - 1 < UNTRAINED_CLUSTER:
            continue
        source = end if t == eot and end is not None else None
        embed[t] = embed[source] if source is not None else embed[~cluster].mean(0)
        if head is not None:
            head[:, t] = head[:, source] if source is not None else head[:, ~cluster].mean(1)
        changed.append(f"{tokenizer.convert_ids_to_tokens(t)} (id {t}, from "
                       f"{tokenizer.convert_ids_to_tokens(source) if source is not None else 'the mean'})")
    params["embed"] = embed
    if head is not None:
        params["lm_head"] = head
    return changed


# ----------------------------------------------------------------------------------------------
# The command


def init_spec(cfg: Config, init: str) -> str:
    """The model SFT starts from: model.name (init "base"), or θt (init "iter<t>")."""
    if init == "base":
        return cfg.model.name
    return rundir.opponent_spec(cfg.model.name, cfg.run_dir, parse_init(init),
                                cfg.sft_dir() if cfg.model.init == "sft" else None)


def parse_init(init: str) -> int:
    if init.startswith("iter") and init[4:].isdigit():
        return int(init[4:])
    raise ValueError(f"--init {init!r}: expected base or iter<t> (e.g. iter0)")


def default_updates(cfg: Config, init: str) -> Optional[int]:
    """The paper's baseline: as many updates as SPIN iteration t took (None for init "base")."""
    if init == "base":
        return None
    t = parse_init(init)
    if not rundir.is_trained(cfg.run_dir, t):
        raise FileNotFoundError(f"--init {init} takes as many updates as SPIN iteration {t}, which is not trained "
                                f"({rundir.model_dir(cfg.run_dir, t)} is missing); train it first, or pass --updates N")
    return int(rundir.read_or_rebuild_summary(cfg.run_dir, t)["steps"])


def sft_rows(cfg: Config, tokenizer) -> list[dict]:
    """The conversations SFT trains on: the first sft.num_conversations (default data.num_prompts)
    of data.train_split whose prompt fits max_prompt_length, as SPIN's iterations pick theirs."""
    from spin_jax.data.prompts import prompt_rows

    return prompt_rows(cfg.data, cfg.data.train_split, cfg.sft.num_conversations or cfg.data.num_prompts, tokenizer)


def is_done(out_dir: str) -> bool:
    return os.path.exists(os.path.join(out_dir, "model", "config.json"))


def run_sft(cfg: Config, init: str = "base", updates: Optional[int] = None, progress: bool = True,
            stop_after: Optional[int] = None) -> dict:
    """SFT of init's model on the config's conversations into cfg.sft_dir(init)/model, resumably."""
    sharding.maybe_initialize_distributed(cfg.distributed)
    out_dir = cfg.sft_dir(init)
    if is_done(out_dir):
        log.info(f"SFT is already done: {out_dir}/model (delete it to train again)")
        return rundir.read_json(os.path.join(out_dir, rundir.SUMMARY)) or {}
    if updates is None:
        updates = default_updates(cfg, init)
    lock = rundir.locked(out_dir, f"spin-jax sft --init {init}") if jax.process_index() == 0 else _null()
    with lock:
        return _run_sft(cfg, init, updates, progress, stop_after, out_dir)


def _null():
    import contextlib

    return contextlib.nullcontext()


def _run_sft(cfg: Config, init: str, updates, progress: bool, stop_after, out_dir: str) -> dict:
    from spin_jax import train
    from spin_jax.io import hf
    from spin_jax.io.load import load_model_for
    from spin_jax.model import lora

    t_start = time.time()
    mesh = sharding.mesh_from_config(cfg.mesh)
    spec = init_spec(cfg, init)
    theta = load_model_for(cfg.model, spec)
    f, d = cfg.sft, cfg.data
    row_length = f.max_length or d.max_length
    rows = sft_rows(cfg, theta.tokenizer)
    encoded = encode_conversations(theta.tokenizer, rows, loss_on=f.loss_on, max_length=row_length,
                                   first_turn_only=f.first_turn_only, where=f"{d.name} {d.train_split}",
                                   progress=progress)
    if f.fix_untrained_tokens:
        fixed = fix_untrained_tokens(theta.params, theta.cfg, theta.tokenizer, encoded)
        if fixed:
            log.info(f"sft.fix_untrained_tokens: {', '.join(fixed)}: shared one embedding with many untrained "
                     "tokens (a base model's unused chat tokens)")
    model = lora.frozen_base(theta, cfg.model)
    tc = f.train_section(cfg.train)
    schedule = Schedule(encoded, row_length, f.packing, f.global_batch_size, d.seed, f.epochs, updates)
    supervised = sum(sum(m[1:]) for _, m in encoded)
    log.info(f"SFT from {spec}: {len(encoded)} conversations ({supervised} supervised tokens, loss on {f.loss_on}"
             f"{', packed' if f.packing else ''}), {schedule.steps} updates of {f.global_batch_size} rows of at most "
             f"{row_length} tokens, lr {f.learning_rate:g} ({f.lr_schedule}), mesh {dict(mesh.shape)}")
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        rundir.write_json(os.path.join(out_dir, rundir.CONFIG), dict(cfg.to_dict(), sft_init=init, sft_from=spec,
                                                                      sft_updates=schedule.steps))
    pad = model.tokenizer.pad_token_id or 0

    def batches_from(start):
        return schedule.host_batches(start, jax.process_index(), jax.process_count(), pad)

    label = "sft" if init == "base" else f"sft_from_{init}"
    objective = SftObjective(model.cfg, tc)
    with tracking.start(cfg, label) as tracker:
        trainer = train.Trainer(model.cfg, tc, mesh, schedule.steps, f.learning_rate, out_dir, progress=progress,
                                on_metrics=lambda m: tracker.sft_update(label, m["step"], m), objective=objective,
                                desc=label)
        lo = cfg.model.lora
        if lo.rank:
            adapters = lora.init_adapters(model.cfg, lo.targets, lo.rank, jax.random.key(d.seed))
            final, summary = trainer.run(adapters, None, batches_from, stop_after=stop_after, base=model.params)
        else:
            params = jax.tree.map(lambda x: np.asarray(x, model.cfg.param_dtype), model.params)
            final, summary = trainer.run(params, None, batches_from, stop_after=stop_after)
        if stop_after is not None and summary["steps"] < schedule.steps:
            return summary
        if jax.process_index() == 0:
            summary = dict(summary, init=init, start_model=spec, conversations=len(encoded),
                           supervised_tokens=supervised, updates=schedule.steps, epochs_read=schedule.epochs_read,
                           wall_seconds=time.time() - t_start)
            rundir.write_json(os.path.join(out_dir, rundir.SUMMARY), summary)
            dtype = theta.cfg.param_dtype
            if lo.rank:
                with rundir.written_dir(os.path.join(out_dir, "adapter")) as tmp:
                    lora.export_peft(final, theta.cfg, tmp, lo.targets, lo.rank, lo.alpha, lo.dropout, spec)
                final = lora.merge(theta.params, final, model.cfg.lora_scale, dtype=jnp.dtype(dtype))
            card = sft_model_card(cfg, init, spec, summary)
            with rundir.written_dir(os.path.join(out_dir, "model")) as tmp:
                hf.export_hf_dir(final, theta.cfg, tmp, model.tokenizer, dtype=dtype, extra_files={"README.md": card})
            log.info(f"SFT done: {out_dir}/model ({schedule.steps} updates, final loss "
                     f"{_last_loss(out_dir)}, {summary['train_seconds']:.0f} s training)")
    sharding.barrier("sft")
    return summary


def _last_loss(out_dir: str) -> str:
    import json

    try:
        with open(os.path.join(out_dir, rundir.METRICS), encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        return f"{json.loads(lines[-1])['loss']:.4f}"
    except (OSError, IndexError, KeyError, ValueError):
        return "n/a"


def sft_model_card(cfg: Config, init: str, spec: str, summary: dict) -> str:
    f = cfg.sft
    what = "θ0 for SPIN" if init == "base" else f"the SFT baseline beside SPIN iteration {parse_init(init)}"
    return "\n".join([
        "---", "library_name: transformers", "tags: [spin_jax, sft]", "---", "",
        f"# {cfg.run_name}: SFT ({what})", "",
        f"Supervised fine-tuning of `{spec}` by spin_jax on {cfg.data.name} ({cfg.data.train_split}):",
        f"{summary['conversations']} conversations, loss on {f.loss_on} tokens"
        f"{' (first turns only)' if f.first_turn_only else ''}{', packed' if f.packing else ''}; "
        f"{summary['updates']} updates of {f.global_batch_size} rows, {f.optimizer} lr {f.learning_rate:g} "
        f"({f.lr_schedule}, warmup {f.warmup_ratio}).", ""])
