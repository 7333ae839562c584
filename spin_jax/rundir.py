"""The run directory: its paths and file formats, with one reader and one writer for each. No JAX.

    runs/<run>/eval.jsonl                 one record per `spin-jax evaluate`
    runs/<run>/benchmarks.jsonl           one record per model and lm-eval task (`spin-jax benchmark`)
    runs/<run>/iter<t>/synthetic/         the iteration's store (spin_jax.data.store)
    runs/<run>/iter<t>/checkpoints/       orbax checkpoints (resume)
    runs/<run>/iter<t>/model/             θ(t+1) as an HF directory: iteration t+1's init and opponent
    runs/<run>/iter<t>/metrics.jsonl      one JSON line per update; TensorBoard events in tensorboard/
    runs/<run>/iter<t>/summary.json       the iteration's summary (first/last-quarter means)
    runs/<run>/iter<t>/config.json        the config the iteration ran with
    runs/<run>/iter<t>/eval_samples.jsonl the held-out samples of the newest evaluation

`spin-jax report` reads everything through this module, so it runs without JAX.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from typing import BinaryIO, Iterable, Iterator, Optional, Sequence

from spin_jax.config import HUB_REPO_ID, lr_for_iter
from spin_jax.errors import RunLocked, UsageError

METRICS, SUMMARY, CONFIG, EVAL, EVAL_SAMPLES = ("metrics.jsonl", "summary.json", "config.json", "eval.jsonl",
                                                "eval_samples.jsonl")
BENCHMARKS = "benchmarks.jsonl"
SUMMARY_KEYS = ("loss", "rewards/real", "rewards/generated", "rewards/margins", "rewards/accuracies",
                "logps/real", "logps/generated")


# ----------------------------------------------------------------------------------------------
# Paths


def cache_home(*parts: str) -> str:
    """spin_jax's folder in the user's cache (~/.cache/spin_jax, or $XDG_CACHE_HOME/spin_jax): joined
    embedded models, compiled programs."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "spin_jax", *parts)


def cache_off(setting: str) -> bool:
    """Whether a cache setting (SPIN_JAX_COMPILE_CACHE, SPIN_JAX_PLAN_CACHE, ...) turns its cache off."""
    return setting.lower() in ("off", "0", "false", "none")


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes (hex)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def iter_dir(run_dir: str, t: int) -> str:
    return os.path.join(run_dir, f"iter{t}")


def store_dir(run_dir: str, t: int) -> str:
    return os.path.join(iter_dir(run_dir, t), "synthetic")


def adapter_dir(run_dir: str, t: int) -> str:
    """With LoRA: iteration t's adapter in PEFT's format, on θt (written before model/)."""
    return os.path.join(iter_dir(run_dir, t), "adapter")


def model_dir(run_dir: str, t: int) -> str:
    """θ(t+1), the model iteration t trained."""
    return os.path.join(iter_dir(run_dir, t), "model")


def is_trained(run_dir: str, t: int) -> bool:
    return os.path.exists(os.path.join(model_dir(run_dir, t), "config.json"))


def iterations(run_dir: str) -> list[int]:
    """The t of every iter<t>/ directory, sorted; an error if there are none."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir} does not exist (a run dir is runs/<run_name>, "
                                "e.g. runs/smollm2_sharegpt)")
    found = sorted(int(m.group(1)) for name in os.listdir(run_dir)
                   if (m := re.fullmatch(r"iter(\d+)", name)) and os.path.isdir(os.path.join(run_dir, name)))
    if not found:
        raise FileNotFoundError(f"{run_dir} holds no iter<t>/ directories; run `make train ITER=0` first")
    return found


def opponent_spec(base_model: str, run_dir: str, t: int, sft_dir: Optional[str] = None) -> str:
    """θt: for t = 0 the base model, or with `sft_dir` (model.init: sft) the SFT model in it; else
    iteration t-1's exported model (which must exist)."""
    if t == 0:
        if sft_dir is None:
            return base_model
        sft_model = os.path.join(sft_dir, "model")
        if not os.path.exists(os.path.join(sft_model, "config.json")):
            raise FileNotFoundError(f"model.init=sft: θ0 is {sft_model}, which does not exist; run `make sft` "
                                    "(or `spin-jax sft --config ...`) first")
        return sft_model
    prev = model_dir(run_dir, t - 1)
    if not is_trained(run_dir, t - 1):
        raise FileNotFoundError(
            f"iteration {t} starts from iteration {t - 1}'s model, but {prev} does not exist; run "
            f"`make train ITER={t - 1}` (or `spin-jax train --config ... --iter {t - 1}`) first")
    return prev


def model_specs(base_model: str, run_dir: str, t: int, sft_dir: Optional[str] = None) -> list[tuple[str, str]]:
    """[(label, model path)] for θ0 (the base, or with `sft_dir` its SFT model, label "sft") ..
    θ(t+1) (iteration t's model); each must exist."""
    if t < 0:
        raise ValueError(f"--iter {t}: iterations start at 0")
    specs = [("sft" if sft_dir else "base", opponent_spec(base_model, run_dir, 0, sft_dir))]
    for k in range(t + 1):
        if not is_trained(run_dir, k):
            raise FileNotFoundError(
                f"iteration {t} needs the models of iterations 0..{t}, but iteration {k}'s model "
                f"{model_dir(run_dir, k)} does not exist; run `make train ITER={k}` (or `spin-jax train "
                f"--config ... --iter {k}`) first")
        specs.append((f"iter{k}", model_dir(run_dir, k)))
    return specs


def side_models(base_model: str, run_dir: str, t: int, sft_dir: Optional[str] = None) -> list[tuple[str, str]]:
    """[(label, model path)] of the models listed beside θ0 .. θ(t+1): the base model when θ0 is its
    SFT (`sft_dir`), and the SFT baseline of each iteration k <= t that has one
    (sft_from_iter<k>/model, `spin-jax sft --init iter<k>`)."""
    out = [("base", base_model)] if sft_dir else []
    for k in range(t + 1):
        path = os.path.join(run_dir, f"sft_from_iter{k}", "model")
        if os.path.exists(os.path.join(path, "config.json")):
            out.append((f"sft_from_iter{k}", path))
    return out


# ----------------------------------------------------------------------------------------------
# Writing files atomically


@contextlib.contextmanager
def written_dir(target: str):
    """A fresh temporary directory next to `target` for the block to fill, renamed into place whole
    when the block ends (an existing `target`, empty or ours to replace, goes first); removed if
    the block fails. Readers see the old directory or the whole new one."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(target))}.tmp", dir=parent)
    try:
        yield tmp
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours: created above
        raise


def atomic_write(path: str, data: bytes | str) -> None:
    """Write `data` to a temporary file next to `path`, fsync it, and rename it into place: a
    reader sees the old file or the whole new one, never a part."""
    with atomic_file(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[BinaryIO]:
    """A binary file open on a fresh temporary name next to `path`. When the block ends without an
    exception it is flushed, fsynced and renamed to `path`; otherwise it is removed."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(directory)


def check_new_dir(path: str, flag: str, protect: Sequence[str] = ()) -> None:
    """A directory to create (or an empty one to fill): refuse an empty name, a file, a symlink, a
    non-empty directory, and any path that is or holds one of `protect` or lies inside it."""
    if not path or not path.strip():
        raise UsageError(f"{flag} is empty; give the path of a new directory")
    if os.path.islink(path):
        raise UsageError(f"{flag} {path} is a symlink; give the path of a new directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file; give the path of a new directory")
    if os.path.isdir(path) and os.listdir(path):
        raise UsageError(f"{flag} {path} exists and is not empty; remove it or choose another directory")
    real = os.path.realpath(path)
    for p in protect:
        p = os.path.realpath(p)
        if real == p or real.startswith(p + os.sep) or p.startswith(real + os.sep):
            raise UsageError(f"{flag} {path} overlaps {p}, which it must not touch; choose another directory")
    parent = os.path.dirname(real)
    if os.path.isdir(parent):
        try:
            os.rmdir(tempfile.mkdtemp(prefix=f".{os.path.basename(real)}.check", dir=parent))
        except OSError as e:
            raise UsageError(f"{flag} {path}: cannot create a directory in {parent} ({e.strerror})") from None


def check_output_file(path: str, flag: str, inputs: Sequence[str] = ()) -> None:
    """An output file, checked before any work: a name, not a directory, not one of `inputs`, in
    an existing directory where a file can be created."""
    if not path or not path.strip():
        raise UsageError(f"{flag} is empty; give a file path")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory; give a file path")
    for i in inputs:
        if i and os.path.realpath(i) == os.path.realpath(path):
            raise UsageError(f"{flag} {path} is also the input; writing it would overwrite the input. "
                             "Choose another output path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: directory {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.check", dir=parent)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot create a file in {parent} ({e.strerror})") from None


def write_jsonl(path: str, rows: Iterable[dict]) -> int:
    """Rows as JSON lines (UTF-8 text kept as is), written atomically. Returns the row count."""
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]
    atomic_write(path, "".join(lines))
    return len(lines)


def check_free_space(directory: str, nbytes: int, what: str) -> None:
    """OSError(ENOSPC) before writing `what` (about nbytes) into `directory` when its file system
    has less room: a clear stop instead of a half-written file."""
    os.makedirs(directory, exist_ok=True)
    free = shutil.disk_usage(directory).free
    need = int(nbytes * 1.05) + (1 << 20)
    if free < need:
        raise OSError(errno.ENOSPC, f"{what} needs about {need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free",
                      directory)


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 of a list of ids (order matters): the store's expected ids, evaluate's prompts."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


# The holder of a lock rewrites its record every LOCK_LEASE_S / 8 seconds; a record older than
# LOCK_LEASE_S belongs to a dead holder (SPIN_JAX_LOCK_LEASE overrides, in seconds).
LOCK_LEASE_S = 120.0
_LOCK_RECORD_BYTES = 512  # the record is rewritten in place at a fixed size: a reader never sees it cut short


@contextlib.contextmanager
def locked(directory: str, what: str) -> Iterator[None]:
    """Hold `directory`/.lock for the block: an advisory flock (the kernel releases it when the
    process dies) plus a record (pid, host, command, heartbeat) the holder rewrites every
    lease/8 seconds. A second holder fails at once with RunLocked, naming the first one's PID and
    host. A lock whose holder is gone is taken over with a log line: on this host when its
    process no longer exists, and on any host when its heartbeat is older than the lease
    (SPIN_JAX_LOCK_LEASE seconds, default 120); that is the case of a preempted host whose flock
    the shared file system (NFS) still holds. A live holder's lock is never taken."""
    lease = float(os.environ.get("SPIN_JAX_LOCK_LEASE") or LOCK_LEASE_S)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        flocked = True
    except BlockingIOError:
        flocked = False
    holder = _lock_record(fd)
    live = _live_holder(holder, lease, flocked)
    if live:
        os.close(fd)
        raise RunLocked(f"{directory} is in use by {live}; wait for it to finish or stop it, then rerun "
                        "(two runs on one iteration would interleave their metrics and checkpoints)")
    if holder and not _same_holder(holder):
        reason = ("its process is gone" if holder.get("host") == socket.gethostname() and flocked else
                  f"no heartbeat for {time.time() - float(holder.get('heartbeat', 0)):.0f} s")
        logging.getLogger("spin_jax").info("%s: taking over the lock of %s: %s", directory, _describe(holder), reason)
    record = dict(pid=os.getpid(), host=socket.gethostname(), what=what,
                  since=time.strftime("%Y-%m-%d %H:%M:%S"), token=os.urandom(8).hex())
    stop = threading.Event()

    def beat() -> None:
        record["heartbeat"] = time.time()
        data = json.dumps(record).encode()
        os.pwrite(fd, data + b" " * max(0, _LOCK_RECORD_BYTES - len(data)), 0)

    def beating() -> None:
        while not stop.wait(lease / 8):
            try:
                beat()
            except OSError:  # a full disk or a vanished share: the lock stays; the run reports its own errors
                pass

    beat()
    os.ftruncate(fd, _LOCK_RECORD_BYTES)
    thread = threading.Thread(target=beating, name="lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        try:
            os.ftruncate(fd, 0)  # no holder: a reader finds no record
        except OSError:
            pass
        os.close(fd)  # releases the flock


def _lock_record(fd: int) -> Optional[dict]:
    """The holder's record in a lock file, or None; an unreadable one is {} (a live holder of
    an earlier format, or one caught mid-write)."""
    raw = os.pread(fd, 4 * _LOCK_RECORD_BYTES, 0).strip()
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return {"text": raw.decode(errors="replace")}
    return record if isinstance(record, dict) else {"text": str(record)}


def _live_holder(holder: Optional[dict], lease: float, flocked: bool) -> Optional[str]:
    """A description of the lock's live holder, or None when the lock is free or its holder dead."""
    if holder is None:
        return None if flocked else "another process"
    if "heartbeat" not in holder:  # no heartbeat to judge by: only the flock tells
        return None if flocked else holder.get("text") or "another process"
    fresh = time.time() - float(holder["heartbeat"]) < lease
    if holder.get("host") == socket.gethostname():
        alive = _pid_alive(int(holder.get("pid", 0)))
        return _describe(holder) if alive and fresh else None
    return _describe(holder) if fresh else None


def _same_holder(holder: dict) -> bool:
    return holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    if "pid" not in holder:
        return holder.get("text") or "another process"
    h = {k: holder.get(k, "?") for k in ("pid", "host", "what", "since")}
    return f"pid {h['pid']} on {h['host']} ({h['what']}, since {h['since']})"


# ----------------------------------------------------------------------------------------------
# JSON files


def read_json(path: str):
    """The parsed file, or None if it does not exist; malformed JSON is an error naming the file."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None


def write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def read_metrics(path: str) -> list[dict]:
    """metrics.jsonl rows in step order. A line that is not JSON (torn by a kill mid-write) is
    skipped; a step logged twice (a resumed run redoes the updates after its last checkpoint)
    keeps its last value."""
    if not os.path.exists(path):
        return []
    by_step = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError(f"{path}:{n}: no 'step' key; metrics.jsonl rows come from `spin-jax train`")
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def read_eval_jsonl(path: str) -> list[dict]:
    """eval.jsonl records in file order (empty if the file does not exist); a bad line names the
    file and line."""
    return read_records(path, ("iteration", "spin", "models"), "`spin-jax evaluate`", "delete the line")


def read_records(path: str, keys: Sequence[str], writer: str, fix: str, torn_last: bool = False) -> list[dict]:
    """The JSON lines of an appended record file, each a dict with `keys`; a bad line is an error
    naming the file, the line and `fix`. torn_last: a malformed last line (a killed writer) is left out."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if torn_last and n == len(lines):
                continue
            raise ValueError(f"{path}:{n}: malformed JSON ({e.msg}); {fix}") from None
        for key in keys:
            if not isinstance(rec, dict) or key not in rec:
                raise ValueError(f"{path}:{n}: no {key!r} key; {os.path.basename(path)} lines come from {writer}")
        out.append(rec)
    return out


def append_eval(run_dir: str, record: dict) -> None:
    append_jsonl(os.path.join(run_dir, EVAL), record)


def flatten(d: dict, sep: str = ".", prefix: str = "") -> dict:
    """A nested dict as {dotted key: value} (keys joined by `sep`)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, sep, f"{prefix}{k}{sep}"))
        else:
            out[prefix + k] = v
    return out


def append_jsonl(path: str, record: dict) -> None:
    """One JSON line appended and synced: a killed job loses at most the line it was writing."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_benchmarks(path: str) -> list[dict]:
    """benchmarks.jsonl's records in file order (empty if there is none). A torn last line (a
    killed run) is left out: its model and task are scored again."""
    return read_records(path, ("label", "task", "value"), "`spin-jax benchmark`",
                         "delete the line (its model and task are scored again)", torn_last=True)


def latest_evals(run_dir: str) -> dict[int, dict]:
    """The newest eval.jsonl record of each iteration, by iteration."""
    out = {int(rec["iteration"]): rec for rec in read_eval_jsonl(os.path.join(run_dir, EVAL))}
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------
# The iteration's summary


def quarter_means(history: list[dict], keys: Sequence[str] = SUMMARY_KEYS) -> tuple[dict, dict]:
    """Means of each key over the first and the last 25% of updates (at least one update each)."""
    if not history:
        return {}, {}
    k = max(1, len(history) // 4)

    def mean(part):
        return {key: sum(h[key] for h in part) / len(part) for key in keys if all(key in h for h in part)}

    return mean(history[:k]), mean(history[-k:])


def read_or_rebuild_summary(run_dir: str, t: int) -> dict:
    """A trained iteration's summary.json; rebuilt from metrics.jsonl (and rewritten) when it is
    missing or torn, e.g. by a kill between the export and the summary."""
    path = os.path.join(iter_dir(run_dir, t), SUMMARY)
    try:
        summary = read_json(path)
    except ValueError:
        summary = None
    if isinstance(summary, dict) and "first_quarter" in summary:
        return summary
    rows = read_metrics(os.path.join(iter_dir(run_dir, t), METRICS))
    counts = {"steps": len(rows), "skipped_updates": int(rows[-1].get("skipped", 0)) if rows else 0,
              "train_seconds": 0.0, "rebuilt_from": METRICS}
    summary = summarize(counts, 0.0, t, run_dir)
    write_json(path, summary)
    return summary


def summarize(train_summary: dict, wall: float, t: int, run_dir: str) -> dict:
    """The iteration's summary: the trainer's counts plus first/last-quarter means over every
    update, read from metrics.jsonl (so a resumed run is summarised whole)."""
    first, last = quarter_means(read_metrics(os.path.join(iter_dir(run_dir, t), METRICS)))
    return dict(train_summary, iteration=t, wall_seconds=wall, first_quarter=first, last_quarter=last)


def format_summary(s: dict) -> str:
    lines = [f"=== SPIN iteration {s['iteration']}: {s['steps']} updates, {s['skipped_updates']} skipped, "
             f"train {s['train_seconds']:.0f}s, total {s['wall_seconds']:.0f}s ===",
             f"{'metric':<22}{'first 25%':>12}{'last 25%':>12}"]
    for key in SUMMARY_KEYS:
        if key in s["first_quarter"]:
            lines.append(f"{key:<22}{s['first_quarter'][key]:>12.4f}{s['last_quarter'][key]:>12.4f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The synthetic store's manifest, as the report and the model card read it


def store_digest(shards: dict) -> str:
    """A content hash of a store: the names and sha256 of its shards (manifest entries)."""
    text = json.dumps({n: e["sha256"] for n, e in sorted(shards.items())})
    return hashlib.sha256(text.encode()).hexdigest()


def store_info(run_dir: str, t: int) -> Optional[dict]:
    """{"digest", "rows", "expected"} of iteration t's store from its manifest, or None if it has
    no shards yet."""
    manifest = read_json(os.path.join(store_dir(run_dir, t), "manifest.json"))
    if not manifest or not manifest.get("shards"):
        return None
    return {"digest": store_digest(manifest["shards"]), "rows": manifest.get("rows"),
            "expected": manifest.get("expected")}


# ----------------------------------------------------------------------------------------------
# The model card


def _front_matter(base: str, library: str, *tags: str) -> list[str]:
    """The card's YAML front matter, which the Hub reads: the base model (when it is a Hub id), the
    library that loads the directory, and the tags."""
    return ["---", *([f"base_model: {base}"] if HUB_REPO_ID.fullmatch(base) else []), f"library_name: {library}",
            "tags:", *(f"- {tag}" for tag in ("spin", "self-play", "spin_jax", *tags)), "---", ""]


def adapter_card(run_dir: str, t: int, conf: dict) -> str:
    """The card of iteration t's LoRA adapter: what it is, its base, how PEFT loads it."""
    base = conf["base_model_name_or_path"]
    return "\n".join(_front_matter(base, "peft", "lora") + [
        f"# SPIN iteration {t} (spin_jax): LoRA adapter", "",
        f"Self-Play Fine-Tuning (Chen et al., arXiv 2401.01335), iteration {t}: a rank-{conf['r']} LoRA adapter "
        f"(alpha {conf['lora_alpha']}, on {', '.join(conf['target_modules'])}) trained on θ{t} against θ{t} as the "
        f"opponent. θ{t}, its base, is `{base}`; the base plus this adapter is θ{t + 1}.", "",
        "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
        f"base = AutoModelForCausalLM.from_pretrained({base!r})",
        "model = PeftModel.from_pretrained(base, DIR)  # DIR: this directory or its Hub repo",
        f"merged = model.merge_and_unload()  # θ{t + 1} as a plain transformers model",
        "```", ""]) + _settings_lines(run_dir, t)


def _settings_lines(run_dir: str, t: int) -> str:
    rec = read_json(os.path.join(iter_dir(run_dir, t), CONFIG)) or {}
    tr = rec.get("train", {})
    if not tr:
        return ""
    lr = lr_for_iter(tr["learning_rate"], tr.get("learning_rates") or (), t)
    return (f"Training: loss {tr['loss_type']}, beta {tr['beta']}, optimizer {tr['optimizer']}, lr {lr:g}, "
            f"epochs {tr['epochs']}, global batch {tr['global_batch_size']}.\n")


def model_card(run_dir: str, t: int, dtype: str, summary: Optional[dict] = None) -> str:
    """The model card of iteration t's model: base model, data, settings (iter<t>/config.json),
    training summary (given, else summary.json) and held-out results, and how to benchmark it."""
    rec = read_json(os.path.join(iter_dir(run_dir, t), CONFIG))
    if rec is None:
        raise FileNotFoundError(f"{iter_dir(run_dir, t)}/{CONFIG} not found: iteration {t} has not been trained")
    m, d, s, tr = rec["model"], rec["data"], rec["sampling"], rec["train"]
    lr = lr_for_iter(tr["learning_rate"], tr.get("learning_rates") or (), t)
    digests = [f"iter{k} `{info['digest'][:16]}`" for k in range(t + 1) if (info := store_info(run_dir, k))]
    lines = _front_matter(m["name"], "transformers") + [f"# SPIN iteration {t} (spin_jax): θ{t + 1}", "",
             f"Self-Play Fine-Tuning (Chen et al., arXiv 2401.01335), iteration {t} of run "
             f"`{rec.get('run_name')}`: trained from θ{t} against θ{t} as the opponent.", "",
             f"- base model (θ0): `{m['name']}`",
             f"- opponent / init of this iteration: `{rec.get('opponent')}`",
             f"- data: `{d['name']}` split `{d['train_split']}`, {d['num_prompts']} prompts per iteration, "
             f"mix_previous={d['mix_previous']}, max_length {d['max_length']} / prompt {d['max_prompt_length']}",
             f"- synthetic data (store digests): {', '.join(digests) or 'not present'}",
             f"- loss {tr['loss_type']}, beta {tr['beta']}, optimizer {tr['optimizer']}, lr {lr:g}, "
             f"warmup {tr['warmup_ratio']}, epochs {tr['epochs']}, global batch {tr['global_batch_size']}",
             f"- sampling: T={s['temperature']}, top_p={s['top_p']}, top_k={s['top_k']}, "
             f"max_new_tokens={s['max_new_tokens']}, seed {s['seed']}",
             f"- weights: {dtype}"]
    summary = summary or read_json(os.path.join(iter_dir(run_dir, t), SUMMARY))
    if summary:
        last = summary.get("last_quarter", {})
        lines.append(f"- training: {summary.get('steps')} updates, wall {summary.get('wall_seconds', 0):.0f}s; "
                     "last 25%: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()))
    e = latest_evals(run_dir).get(t)
    if e:
        lines.append(f"- held-out ({e['num_prompts']} prompts of `{e['settings']['eval_split']}`): "
                     + ", ".join(f"{k} {v:.4f}" for k, v in e["spin"].items()))
    lines += ["", "## Use", "", "DIR is this directory.", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(DIR)  # carries the chat template used in training",
              "model = AutoModelForCausalLM.from_pretrained(DIR)", "```", "",
              "The paper's benchmarks: the Open LLM Leaderboard (v1) tasks with lm-eval-harness >= 0.4, "
              "each with its leaderboard few-shot count, and MT-Bench with FastChat:", "",
              "```bash",
              "for t in arc_challenge:25 truthfulqa_mc2:0 winogrande:5 gsm8k:5 hellaswag:10 mmlu:5; do",
              "  lm_eval --model hf --model_args pretrained=DIR,dtype=bfloat16 --tasks ${t%:*} "
              "--num_fewshot ${t#*:} --batch_size auto --output_path results/",
              "done",
              "python -m fastchat.llm_judge.gen_model_answer --model-path DIR --model-id spin-iter" + str(t),
              "```", ""]
    return "\n".join(lines)
