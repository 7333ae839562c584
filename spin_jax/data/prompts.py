"""The prompts of a split that an iteration samples or evaluates on."""

from __future__ import annotations

import logging
import re
from typing import Collection

import jax

from spin_jax import sharding
from spin_jax.data import tokenize

log = logging.getLogger(__name__)


def conversation_root(row_id: str) -> str:
    """The conversation a row comes from: ShareGPT splits a long conversation into rows "<id>_0",
    "<id>_1", …; other sources' ids are their own root."""
    m = re.match(r"^(.*)_\d+$", str(row_id))
    return m.group(1) if m else str(row_id)


def split_ids(data_cfg, split: str) -> list[str]:
    """Every row id of a split (a data set's rows decode one by one: seconds for ShareGPT)."""
    from spin_jax.data.builders import load_split

    d = data_cfg
    rows = load_split(d.name, d.data_dir, split, d.manual_dir, d.max_bad_fraction)
    return [rows[i]["id"] for i in range(len(rows))]


def prompt_rows(data_cfg, split: str, limit: int, tokenizer, exclude_conversations: Collection[str] = ()) -> list[dict]:
    """The first `limit` rows of `split` whose templated prompt fits max_prompt_length tokens
    (longer prompts are skipped, counted and reported: the reference would cut their start); with
    data.complete_responses, only rows whose human response ends within the response budget; rows
    of a conversation in `exclude_conversations` (conversation_root) are left out."""
    from spin_jax.data.builders import load_split

    d = data_cfg
    # Hosts may share data_dir: host 0 prepares the data set, the others read it afterwards.
    if jax.process_index() != 0:
        sharding.barrier(f"prepare {d.name}")
    rows = load_split(d.name, d.data_dir, split, d.manual_dir, d.max_bad_fraction)
    if jax.process_index() == 0:
        sharding.barrier(f"prepare {d.name}")
    out, skipped, cut, shared = [], 0, 0, 0
    budget = d.max_length - d.max_prompt_length
    for i in range(len(rows)):
        if len(out) == limit:
            break
        row = rows[i]
        if exclude_conversations and conversation_root(row["id"]) in exclude_conversations:
            shared += 1
            continue
        if len(tokenize.prompt_ids(tokenizer, row["prompt"])) > d.max_prompt_length:
            skipped += 1
            continue
        if d.complete_responses and len(tokenize.response_ids(tokenizer, row["response"])) > budget:
            cut += 1
            continue
        out.append(row)
    if skipped:
        log.info(f"{d.name} {split}: skipped {skipped} prompts longer than max_prompt_length={d.max_prompt_length}")
    if cut:
        log.info(f"{d.name} {split}: skipped {cut} rows whose response does not end within {budget} tokens "
                 "(data.complete_responses)")
    if shared:
        log.info(f"{d.name} {split}: skipped {shared} rows of conversations that the other split holds")
    if len(out) < limit:
        log.info(f"{d.name} {split}: only {len(out)} usable prompts (asked for {limit})")
    return out
