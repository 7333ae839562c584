"""The prompts of a split that an iteration samples or evaluates on."""

from __future__ import annotations

import logging

import jax

from spin_jax import sharding
from spin_jax.data import tokenize

log = logging.getLogger(__name__)


def prompt_rows(data_cfg, split: str, limit: int, tokenizer) -> list[dict]:
    """The first `limit` rows of `split` whose templated prompt fits max_prompt_length tokens
    (longer prompts are skipped, counted and reported: the reference would cut their start)."""
    from spin_jax.data.builders import load_split

    d = data_cfg
    # Hosts may share data_dir: host 0 prepares the data set, the others read it afterwards.
    if jax.process_index() != 0:
        sharding.barrier(f"prepare {d.name}")
    rows = load_split(d.name, d.data_dir, split, d.manual_dir, d.max_bad_fraction)
    if jax.process_index() == 0:
        sharding.barrier(f"prepare {d.name}")
    out, skipped = [], 0
    for i in range(len(rows)):
        if len(out) == limit:
            break
        if len(tokenize.prompt_ids(tokenizer, rows[i]["prompt"])) > d.max_prompt_length:
            skipped += 1
            continue
        out.append(rows[i])
    if skipped:
        log.info(f"{d.name} {split}: skipped {skipped} prompts longer than max_prompt_length={d.max_prompt_length}")
    if len(out) < limit:
        log.info(f"{d.name} {split}: only {len(out)} usable prompts (asked for {limit})")
    return out
