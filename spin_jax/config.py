"""Run configuration: a tree of frozen dataclasses, loaded from YAML with dotted CLI overrides.

    cfg = load_config("configs/cpu_default.yaml", ["train.learning_rate=1e-5", "mesh.data=8"])

Unknown keys and wrongly typed values are errors that name the file and the key.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Optional

import yaml


@dataclasses.dataclass(frozen=True)
class ModelSection:
    name: str = "smollm2-135m-instruct"  # embedded name, .gguf path, or HF directory
    dtype: str = "float32"  # compute dtype (bfloat16 on TPU/GPU)
    param_dtype: str = "float32"  # master weights
    remat: str = "none"  # none | full | dots
    attn_block: int = 128  # causal attention in query blocks of this many (skips keys after the block); 0: one block


@dataclasses.dataclass(frozen=True)
class DataSection:
    name: str = "sharegpt"  # sharegpt | ultrachat_200k
    data_dir: str = "data/tfds"  # where TFDS builders prepare their array_record files
    manual_dir: Optional[str] = None  # ultrachat_200k: local copy of the HF parquet files
    train_split: str = "train"
    eval_split: str = "test"
    num_prompts: int = 256  # prompts per iteration (first N of train_split after the eval hold-out)
    num_eval_prompts: int = 32
    max_length: int = 1024
    max_prompt_length: int = 512
    mix_previous: bool = True  # iteration t >= 1 trains on iter t-1's + iter t's synthetic data
    max_bad_fraction: float = 0.0  # share of bad rows that may be skipped (and counted)
    seed: int = 42


@dataclasses.dataclass(frozen=True)
class SamplingSection:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    batch_size: int = 16
    decode_phases: int = 4  # decode loops with growing attention windows (each one more compiled step)
    chunk_size: int = 64  # prompts per store shard (the unit of resumption)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainSection:
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | hinge | ipo
    optimizer: str = "rmsprop"  # rmsprop (the paper's) | adamw
    learning_rate: float = 5e-7
    # Per-iteration learning rates (the paper: 5e-7 for iterations 0-1, 1e-7 from 2); the last
    # entry applies to later iterations. Empty = learning_rate everywhere.
    learning_rates: tuple = ()
    warmup_ratio: float = 0.1
    epochs: int = 2
    global_batch_size: int = 64  # pairs per optimizer update
    grad_accum: int = 1  # micro-batches per update (global_batch_size must divide by it)
    max_grad_norm: float = 0.0  # 0 = no clipping
    weight_decay: float = 0.0
    opponent_logps: str = "precomputed"  # precomputed (stored once per iteration) | in_step
    vocab_chunk: int = 0  # compute log-probs this many vocab columns at a time (0 = all)
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1

    def lr_for_iter(self, t: int) -> float:
        return lr_for_iter(self.learning_rate, self.learning_rates, t)


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = -1  # -1 = all devices left
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    coordinator_address: Optional[str] = None  # host:port; None = auto-detect on TPU pods
    num_processes: Optional[int] = None
    process_id: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Config:
    run_name: str = "default"
    runs_dir: str = "runs"
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    sampling: SamplingSection = SamplingSection()
    train: TrainSection = TrainSection()
    mesh: MeshSection = MeshSection()
    distributed: DistributedSection = DistributedSection()

    @property
    def run_dir(self) -> str:
        return os.path.join(self.runs_dir, self.run_name)

    def iter_dir(self, t: int) -> str:
        return os.path.join(self.run_dir, f"iter{t}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lr_for_iter(learning_rate: float, learning_rates, t: int) -> float:
    """Iteration t's learning rate: learning_rates[t] (the last entry for later iterations), or
    learning_rate when the list is empty."""
    if not learning_rates:
        return float(learning_rate)
    return float(learning_rates[min(t, len(learning_rates) - 1)])


def load_config(path: Optional[str] = None, overrides: typing.Sequence[str] = ()) -> Config:
    raw: dict = {}
    if path:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"config {path} not found (see configs/ for the shipped ones)") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected key.path=value, e.g. train.learning_rate=1e-5")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return _build(Config, raw, path or "<overrides>", "")


def _build(cls, raw: dict, where: str, prefix: str):
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ValueError(f"{where}: unknown key {prefix}{key!r}; known: {', '.join(fields)}")
        kwargs[key] = _coerce(hints[key], value, where, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(hint, value: Any, where: str, key: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: {key} must be a list, got {value!r}")
        return tuple(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ValueError(f"{where}: {key} must be {hint.__name__}, got {value!r}")
    if hint is float and not isinstance(value, float):
        raise ValueError(f"{where}: {key} must be a number, got {value!r}")
    return value
