"""Iteration stores: the synthetic data of one SPIN iteration, in runs/<run>/iter<t>/synthetic/.

A store is a directory of JSONL shards `shard-<host>-<chunk>.jsonl`, one row per prompt:
    {"id": str, "prompt": str, "real": str, "generated": str, "sampling": {...},
     "opponent_logp_real": float | None, "opponent_logp_generated": float | None, "model_hash": str}
and a `manifest.json` naming every complete shard, the ids it holds, its size and sha256, and the
expected number of prompts (the ids themselves, from `set_expected`, in `expected_ids.json`).

Shards are written to a temporary file, fsynced and renamed into place, so a shard that exists is
complete. The manifest is an index, rewritten atomically under a lock file; a shard renamed into
place by a writer killed before the manifest update is still found (and indexed on the next
write). Work is planned by chunk of the expected id list (`pending_chunks`), so a resumed writer
rewrites exactly the chunks that are not complete: no duplicates, nothing missing. Readers also
drop a repeated id (first shard in name order wins).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import math
import os
import re
from typing import Iterable, Iterator, Mapping, Sequence

from spin_jax import rundir

MANIFEST = "manifest.json"
EXPECTED = "expected_ids.json"
SHARD_RE = re.compile(r"^shard-(\d+)-(\d+)\.jsonl$")
TEXT_FIELDS = ("id", "prompt", "real", "generated", "model_hash")
LOGP_FIELDS = ("opponent_logp_real", "opponent_logp_generated")


def training_rows(run_dir: str, t: int, mix_previous: bool = True) -> list[dict]:
    """Iteration t's store rows, plus iteration t-1's when t >= 1 and mix_previous (the reference
    trains iteration t on the union of both). Each row gains "iteration"."""
    rows = []
    for it in ([t, t - 1] if mix_previous and t >= 1 else [t]):
        directory = rundir.store_dir(run_dir, it)
        store = SyntheticStore(directory)
        if not os.path.isdir(directory) or not store.shard_names():
            raise FileNotFoundError(f"{directory}: no synthetic data for iteration {it}; run "
                                    f"`make generate ITER={it}` first")
        missing = store.missing_count()
        if missing:
            raise ValueError(f"{directory}: iteration {it}'s synthetic data is incomplete "
                             f"({missing} prompts missing); rerun `make generate ITER={it}` to finish it")
        rows.extend(dict(r, iteration=it) for r in store.rows())
    return rows


def pending_chunks(expected_ids: Sequence[str], chunk_size: int, done: set[str],
                   process_index: int = 0, process_count: int = 1) -> list[tuple[int, list[str]]]:
    """This host's chunks (chunk c of the expected ids goes to host c % process_count) that still
    hold an id not in `done`, as (chunk, ids). Rewriting such a chunk replaces its shard whole."""
    chunks = []
    for c, start in enumerate(range(0, len(expected_ids), chunk_size)):
        ids = list(expected_ids[start:start + chunk_size])
        if c % process_count == process_index and not done.issuperset(ids):
            chunks.append((c, ids))
    return chunks


class SyntheticStore:
    """One iteration's synthetic rows (see the module docstring)."""

    def __init__(self, directory: str):
        self.dir = directory

    # ----------------------------------------------------------------------------------- writing
    def write_shard(self, host: int, chunk: int, rows: Iterable[dict]) -> str:
        """Write `rows` as shard-<host>-<chunk>.jsonl atomically (replacing an earlier one) and
        index it in the manifest. `rows` may be a generator; it is streamed to a temporary file."""
        os.makedirs(self.dir, exist_ok=True)
        name = shard_name(host, chunk)
        final = os.path.join(self.dir, name)
        for stale in glob.glob(os.path.join(self.dir, f".{name}.tmp*")):
            os.remove(stale)  # left behind by a writer killed mid-shard
        ids, seen = [], set()
        digest = hashlib.sha256()
        with rundir.atomic_file(final) as f:
            for k, row in enumerate(rows):
                check_row(row, f"{final}: row {k}")
                if row["id"] in seen:
                    raise ValueError(f"{final}: row {k}: field 'id': {row['id']!r} repeats in the shard")
                ids.append(row["id"])
                seen.add(row["id"])
                line = (json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode()
                digest.update(line)
                f.write(line)
        with self._locked():
            manifest = self._reconciled()
            manifest["shards"][name] = dict(ids=ids, bytes=os.path.getsize(final),
                                            sha256=digest.hexdigest())
            self._write_manifest(manifest)
        return final

    def set_expected(self, expected_ids: Iterable[str]) -> None:
        """Record which prompts the iteration must cover (count and digest) in the manifest."""
        ids = sorted(set(expected_ids))
        with self._locked():
            rundir.atomic_write(os.path.join(self.dir, EXPECTED), json.dumps(ids).encode())
            manifest = self._reconciled()
            self._write_manifest(manifest)

    def update_logps(self, logps: Mapping[str, tuple[float, float]]) -> int:
        """Set opponent_logp_real / opponent_logp_generated = logps[id] on the stored rows,
        rewriting each affected shard atomically. Returns the number of rows updated."""
        missing = set(logps) - self.done_ids()
        if missing:
            raise KeyError(f"{self.dir}: {len(missing)} ids are not in the store, e.g. {sorted(missing)[:3]}")
        updated = 0
        with self._locked():
            manifest = self._reconciled()
            for name, entry in sorted(manifest["shards"].items()):
                if not logps.keys() & set(entry["ids"]):
                    continue
                rows = list(_read_shard(os.path.join(self.dir, name)))
                for row in rows:
                    if row["id"] in logps:
                        real, gen = logps[row["id"]]
                        row["opponent_logp_real"], row["opponent_logp_generated"] = float(real), float(gen)
                        updated += 1
                manifest["shards"][name] = self._rewrite(name, rows)
            self._write_manifest(manifest)
        return updated

    # ----------------------------------------------------------------------------------- reading
    def shard_names(self) -> list[str]:
        if not os.path.isdir(self.dir):
            return []
        return sorted(n for n in os.listdir(self.dir) if SHARD_RE.match(n))

    def manifest(self) -> dict:
        """The manifest reconciled with the shards on disk (read-only)."""
        return self._reconciled()

    def done_ids(self) -> set[str]:
        return {i for entry in self._reconciled()["shards"].values() for i in entry["ids"]}

    def missing_count(self) -> int:
        """Expected prompts (per set_expected) not yet in a shard; 0 if nothing was declared."""
        expected = self.expected_ids()
        return 0 if expected is None else len(set(expected) - self.done_ids())

    def expected_ids(self) -> list[str] | None:
        """The ids declared by set_expected (sorted), or None."""
        path = os.path.join(self.dir, EXPECTED)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def rows(self) -> list[dict]:
        """All rows sorted by id, each id once (the first shard in name order wins)."""
        seen: dict[str, dict] = {}
        for name in self.shard_names():
            for row in _read_shard(os.path.join(self.dir, name)):
                seen.setdefault(row["id"], row)
        return [seen[i] for i in sorted(seen)]

    def digest(self) -> str:
        """A content hash of the store (names and sha256 of its shards)."""
        return rundir.store_digest(self._reconciled()["shards"])

    # ----------------------------------------------------------------------------------- helpers
    def _reconciled(self) -> dict:
        """The manifest with entries for shards it misses (or that changed) and none for shards gone."""
        path = os.path.join(self.dir, MANIFEST)
        manifest = {"version": 1, "expected": None, "shards": {}}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                try:
                    manifest = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: not valid JSON ({e}); delete it and it is rebuilt "
                                     "from the shards") from None
        on_disk = set(self.shard_names())
        shards = {n: e for n, e in manifest.get("shards", {}).items() if n in on_disk}
        for name in on_disk:
            full = os.path.join(self.dir, name)
            if name not in shards or shards[name].get("bytes") != os.path.getsize(full):
                shards[name] = _index_shard(full)
        manifest["shards"] = shards
        expected = self.expected_ids()
        done = {i for e in shards.values() for i in e["ids"]}
        manifest["expected"] = None if expected is None else len(expected)
        manifest["expected_ids_sha256"] = None if expected is None else rundir.ids_digest(expected)
        manifest["rows"] = len(done)
        manifest["complete"] = expected is not None and done.issuperset(expected)
        return manifest

    def _write_manifest(self, manifest: dict) -> None:
        rundir.atomic_write(os.path.join(self.dir, MANIFEST),
                      json.dumps(manifest, ensure_ascii=False, indent=1, sort_keys=True).encode())

    def _rewrite(self, name: str, rows: list[dict]) -> dict:
        data = b"".join((json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode() for r in rows)
        rundir.atomic_write(os.path.join(self.dir, name), data)
        return dict(ids=[r["id"] for r in rows], bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def shard_name(host: int, chunk: int) -> str:
    return f"shard-{int(host):05d}-{int(chunk):06d}.jsonl"


def check_row(row, where: str) -> None:
    """A store row's fields and types; a one-line ValueError naming the field otherwise."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a dict, got {type(row).__name__}")
    for key in TEXT_FIELDS:
        if not isinstance(row.get(key), str):
            raise ValueError(f"{where}: field {key!r}: missing or not a string")
    if not row["id"]:
        raise ValueError(f"{where}: field 'id': empty")
    if not isinstance(row.get("sampling"), dict):
        raise ValueError(f"{where}: field 'sampling': missing or not a dict of sampling parameters")
    for key in LOGP_FIELDS:
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ValueError(f"{where}: field {key!r}: {value!r} is not a finite number or None")


def _read_shard(path: str) -> Iterator[dict]:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: line {n}: not a JSON row ({e}); delete the shard and "
                                 "regenerate its chunk") from None
            check_row(row, f"{path}: line {n}")
            yield row


def _index_shard(path: str) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    return dict(ids=[r["id"] for r in _read_shard(path)], bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest())
