"""SPIN examples: (prompt, real, generated) token ids, and deterministic host-sharded batches.

A batch for B pairs is a `tokenize.SpinBatch` (tokenize.pack_grouped): B prompts and 2B
responses, response 2i prompt i's real one and 2i + 1 its generated one, so one forward pass gives
both log-probs, the prompt computed once. Shapes are bucketed to powers of two from the whole
GLOBAL batch, so every host packs the same shapes and few programs compile.
"""

from __future__ import annotations

from typing import Iterable, Iterator, MutableMapping, NamedTuple, Sequence

import numpy as np

from spin_jax.data import tokenize
from spin_jax.data.sources import NOT_UTF8, BadRows


class BadField(ValueError):
    """A row field that cannot be encoded."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r}: {problem}")
        self.field, self.problem = field, problem


class Encoded(NamedTuple):
    """One SPIN pair as token ids (indexing [0], [1], [2] matches a plain 3-tuple)."""

    prompt: list[int]
    real: list[int]
    generated: list[int]
    id: str = ""
    opponent_logp_real: float | None = None
    opponent_logp_generated: float | None = None


def encode_pair(tokenizer, prompt: str, real: str, generated: str, max_length: int,
                max_prompt_length: int) -> tuple[list[int], list[int], list[int]]:
    """Token ids of one pair, truncated by the reference's rule (tokenize.truncate).

    Raises BadField (a ValueError) naming the field if the prompt or real response is empty, or the templated
    prompt alone is longer than max_length (the rule would cut its chat header off). An empty
    generated response is allowed: the model may answer with end-of-turn straight away.
    """
    _check_lengths(max_length, max_prompt_length)
    for field, text in (("prompt", prompt), ("real", real), ("generated", generated)):
        if not isinstance(text, str):
            raise BadField(field, f"not a string ({type(text).__name__})")
        if NOT_UTF8.search(text):
            raise BadField(field, "not valid UTF-8")
        if field != "generated" and not text.strip():
            raise BadField(field, "empty")
    p = tokenize.prompt_ids(tokenizer, prompt)
    if len(p) > max_length:
        raise BadField("prompt", f"{len(p)} tokens, longer than max_length={max_length} "
                       "(drop the row or raise max_length)")
    r, g = tokenize.response_ids(tokenizer, real), tokenize.response_ids(tokenizer, generated)
    p, (r, g) = tokenize.truncate(p, [r, g], max_length, max_prompt_length)
    return p, r, g


def encode_rows(tokenizer, rows: Iterable[dict], max_length: int, max_prompt_length: int, *,
                source: str = "rows", max_bad_fraction: float = 0.0,
                stats: MutableMapping[str, int] | None = None) -> list[Encoded]:
    """Encode store rows ({"id", "prompt", "real", "generated", opponent log-probs}).

    A bad row raises a one-line ValueError naming `source`, row and field; with max_bad_fraction
    > 0 bad rows are skipped and counted in `stats` until their share exceeds it.
    """
    _check_lengths(max_length, max_prompt_length)
    bad = BadRows(source, max_bad_fraction, stats)
    out = []
    for k, row in enumerate(rows):
        bad.seen()
        if not isinstance(row, dict):
            bad.bad(k, "<row>", f"expected a dict, got {type(row).__name__}")
            continue
        missing = [f for f in ("id", "prompt", "real", "generated") if f not in row]
        if missing:
            bad.bad(k, missing[0], "missing")
            continue
        try:
            p, r, g = encode_pair(tokenizer, row["prompt"], row["real"], row["generated"],
                                  max_length, max_prompt_length)
        except BadField as e:
            bad.bad(k, e.field, e.problem)
            continue
        out.append(Encoded(p, r, g, str(row["id"]), row.get("opponent_logp_real"),
                           row.get("opponent_logp_generated")))
    bad.finish()
    return out


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full global batches per epoch (the remainder of each shuffled epoch is dropped)."""
    return num_examples // global_batch_size


def make_batches(examples: Sequence, global_batch_size: int, *, seed: int, epoch: int = 0,
                 process_index: int = 0, process_count: int = 1, start_step: int = 0,
                 pad_id: int = 0, min_bucket: int = 16) -> Iterator[tuple[np.ndarray, tokenize.SpinBatch]]:
    """This host's part of each global batch of one epoch, from step `start_step` of the epoch.

    The epoch's order is a permutation seeded by (seed, epoch); global batch s is examples
    order[s*G:(s+1)*G]; host h gets its rows [h*G/H, (h+1)*G/H) (disjoint, union = the batch).
    Yields (index [G/H], batch): the positions in `examples` of this host's pairs, and their
    SpinBatch of G/H prompts and 2G/H responses (real and generated interleaved), whose
    opponent_logps [2G/H] (real, generated, real, ...) are set only when every pair carries both.
    Resuming at start_step yields exactly the batches an uninterrupted read yields from there.
    """
    n = len(examples)
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} must be a positive multiple of "
                         f"process_count {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    steps = steps_per_epoch(n, global_batch_size)
    if steps == 0:
        raise ValueError(f"{n} examples make no full global batch of {global_batch_size}")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} outside the epoch's {steps} steps")
    order = epoch_order(n, seed, epoch)
    local = global_batch_size // process_count
    for step in range(start_step, steps):
        global_idx = order[step * global_batch_size:(step + 1) * global_batch_size]
        batch = [examples[i] for i in global_idx]
        prompt_len = tokenize.bucket(max(len(e[0]) for e in batch), min_bucket)
        response_len = tokenize.bucket(max(max(len(e[1]), len(e[2])) for e in batch), min_bucket)
        mine = slice(process_index * local, (process_index + 1) * local)
        yield _pack(batch[mine], global_idx[mine], prompt_len, response_len, pad_id)


def iter_batches(examples: Sequence, global_batch_size: int, *, seed: int, num_epochs: int,
                 start_step: int = 0, **kwargs) -> Iterator[tuple[int, int, np.ndarray, tokenize.SpinBatch]]:
    """(global step, epoch, index, batch) over `num_epochs` epochs, resuming at global `start_step`."""
    spe = steps_per_epoch(len(examples), global_batch_size)
    if spe == 0:
        raise ValueError(f"{len(examples)} examples make no full global batch of {global_batch_size}")
    for epoch in range(start_step // spe, num_epochs):
        first = start_step - epoch * spe if epoch == start_step // spe else 0
        for k, (index, batch) in enumerate(make_batches(examples, global_batch_size, seed=seed, epoch=epoch,
                                                        start_step=first, **kwargs)):
            yield epoch * spe + first + k, epoch, index, batch


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length}, {max_length}")


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)])).permutation(n)


def _pack(pairs: list, index: np.ndarray, prompt_len: int, response_len: int,
          pad_id: int) -> tuple[np.ndarray, tokenize.SpinBatch]:
    prompts = [list(e[0]) for e in pairs]
    responses = [list(x) for e in pairs for x in (e[1], e[2])]
    logps = [(getattr(e, "opponent_logp_real", None), getattr(e, "opponent_logp_generated", None))
             for e in pairs]
    complete = all(r is not None and g is not None for r, g in logps)
    batch = tokenize.pack_grouped(prompts, responses, prompt_len, response_len, pad_id,
                                  opponent_logps=[x for pair in logps for x in pair] if complete else None)
    return np.asarray(index, np.int64), batch
