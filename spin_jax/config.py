"""Run configuration: a tree of frozen dataclasses, loaded from YAML with dotted CLI overrides.

    cfg = load_config("configs/cpu_default.yaml", ["train.learning_rate=1e-5", "mesh.data=8"])

Unknown keys and wrongly typed values are errors that name the file and the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from typing import Any, Optional

import yaml

# model.attention's values (spin_jax.model.attention.implementation reads them)
ATTENTION = ("auto", "xla", "splash", "splash-interpret")
# sampling.layout's values (spin_jax.sampling.decode_mesh reads them)
DECODE_LAYOUTS = ("auto", "tensor", "replicated", "train")
# model.chat_template's known names (spin_jax.io.templates holds them)
CHAT_TEMPLATES = ("gemma", "chatml", "llama3")


def is_chat_template(value: str) -> bool:
    """A known template name or an existing Jinja file (model.chat_template, --chat-template)."""
    return value in CHAT_TEMPLATES or os.path.isfile(value)


# a Hub repo id, org/name (model.name, data.manual_dir, export --push-to-hub; spin_jax.io.hub)
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# model.lora.targets' names (spin_jax.model.lora.TARGETS maps them to the layers' weights)
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
BASE_DTYPES = ("float32", "bfloat16", "int8", "nf4")


@dataclasses.dataclass(frozen=True)
class LoraSection:
    rank: int = 0  # 0: full fine-tuning; > 0: train LoRA adapters of this rank on a frozen base
    alpha: float = 32.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input, in training
    targets: tuple = LORA_TARGETS  # which projections of each layer get an adapter


@dataclasses.dataclass(frozen=True)
class ModelSection:
    name: str = "smollm2-135m-instruct"  # embedded name, .gguf path, HF directory, or Hub id (org/name)
    # θ0, where iteration 0 starts: base (model.name itself) | sft (runs/<run>/sft/model: model.name after
    # `spin-jax sft`, which `train --iter 0` and `spin` run first when it is absent)
    init: str = "base"
    revision: Optional[str] = None  # a Hub id's branch, tag or commit (default: main)
    dtype: str = "float32"  # compute dtype (bfloat16 on TPU/GPU)
    param_dtype: str = "float32"  # master weights
    remat: str = "none"  # none | full | dots
    attn_block: int = 128  # causal attention in query blocks of this many (skips keys after the block); 0: one block
    # training and scoring attention: auto (Pallas splash kernel on TPU, XLA elsewhere) | xla | splash
    # | splash-interpret (the kernel in Pallas interpret mode, any backend; slow, for checking)
    attention: str = "auto"
    # the chat format, for models that ship none (or to replace theirs): gemma | chatml | llama3 | a Jinja file
    chat_template: Optional[str] = None
    lora: LoraSection = LoraSection()
    # LoRA's frozen base weights: float32 | bfloat16 | int8 | nf4 (QLoRA: dequantized in the matmuls);
    # unset: param_dtype
    base_dtype: Optional[str] = None
    # An HF config.json with the model's shapes, for `spin-jax plan` when model.name is not on this machine
    shapes_config: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class DataSection:
    name: str = "sharegpt"  # sharegpt | ultrachat_200k
    data_dir: str = "data/tfds"  # where TFDS builders prepare their array_record files
    # ultrachat_200k: a local copy of the HF parquet files, or a Hub data set id (org/name[@revision])
    # to download them from; unset: HuggingFaceH4/ultrachat_200k from the Hub
    manual_dir: Optional[str] = None
    train_split: str = "train"
    eval_split: str = "test"
    num_prompts: int = 256  # prompts per iteration (first N of train_split after the eval hold-out)
    num_eval_prompts: int = 32
    max_length: int = 1024
    max_prompt_length: int = 512
    mix_previous: bool = True  # iteration t >= 1 trains on iter t-1's + iter t's synthetic data
    # keep only rows whose human response, end-of-turn token included, fits max_length - max_prompt_length
    # tokens: no real response is cut short (else truncation alone tells real from generated)
    complete_responses: bool = False
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
    # how the opponent's weights lie while decoding: auto (tensor-parallel over a host's chips where the kv
    # heads divide, else replicated where the weights fit, else as in training) | tensor | replicated | train
    layout: str = "auto"
    chunk_size: int = 64  # prompts per store shard (the unit of resumption)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainSection:
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | hinge | ipo
    optimizer: str = "rmsprop"  # rmsprop (the paper's) | adamw
    learning_rate: float = 5e-7
    lr_schedule: str = "linear"  # after warmup, to 0: linear (the reference's) | cosine
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
    max_skipped_fraction: float = 0.1  # more updates skipped (non-finite loss or gradients) stops training

    def lr_for_iter(self, t: int) -> float:
        return lr_for_iter(self.learning_rate, self.learning_rates, t)


@dataclasses.dataclass(frozen=True)
class SftSection:
    """Supervised fine-tuning on the data set's conversations (`spin-jax sft`): θ0 from a base model,
    and the paper's baseline (more SFT from θt). Defaults as alignment-handbook's zephyr-7b-sft-full
    (AdamW, lr 2e-5, cosine, warmup 0.1, 1 epoch). Checkpoints, logging and the NaN guard follow
    the train section."""
    loss_on: str = "assistant"  # assistant (every assistant turn and its end-of-turn token) | all (every token)
    first_turn_only: bool = False  # the first user -> assistant exchange only (else every turn)
    packing: bool = False  # several conversations per row (block-diagonal attention, positions restart)
    # conversations: the first N of data.train_split (0: data.num_prompts, the very ones SPIN plays on)
    num_conversations: int = 0
    # tokens per row (0: data.max_length); a longer conversation keeps the whole turns that fit
    max_length: int = 0
    # a special token the conversations use (e.g. <end_of_turn>) whose embedding a base model left untrained,
    # shared with many unused tokens, starts from the mean embedding (else SFT raises them all with it)
    fix_untrained_tokens: bool = True
    learning_rate: float = 2e-5
    lr_schedule: str = "cosine"  # linear | cosine
    warmup_ratio: float = 0.1
    epochs: int = 1
    optimizer: str = "adamw"  # adamw | rmsprop
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    global_batch_size: int = 16  # rows per update: conversations, or packed rows with sft.packing
    grad_accum: int = 1  # micro-batches per update

    def train_section(self, train: "TrainSection") -> "TrainSection":
        """The train section SFT's Trainer runs with: these optimizer settings, the rest as `train`."""
        return dataclasses.replace(train, learning_rate=self.learning_rate, learning_rates=(),
                                   lr_schedule=self.lr_schedule, warmup_ratio=self.warmup_ratio,
                                   epochs=self.epochs, optimizer=self.optimizer, weight_decay=self.weight_decay,
                                   max_grad_norm=self.max_grad_norm, global_batch_size=self.global_batch_size,
                                   grad_accum=self.grad_accum)


@dataclasses.dataclass(frozen=True)
class StudySection:
    """`make study`: SPIN against more SFT from the same θ0, on held-out prompts (docs/study.md)."""
    iterations: int = 3  # SPIN iterations θ1 .. θT, and as many SFT steps beside them
    num_heldout: int = 300  # held-out prompts of data.eval_split every model answers
    seeds: tuple = (0,)  # sampling seeds of the held-out answers (the metrics average over them)
    feature_model: str = "gemma3-270m"  # a frozen model no arm trains: its pooled hidden states feed MAUVE
    feature_batch: int = 16
    mauve_buckets: int = 0  # k-means clusters of the MAUVE quantization (0: mauve-text's rule, samples / 10)
    bootstrap: int = 2000  # paired bootstrap resamples over held-out prompts
    tasks: str = "arc_easy,arc_challenge,hellaswag,piqa,winogrande"  # lm-eval tasks (benchmark --data auto)
    task_limit: int = 250  # documents per task (0: all)


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
class WandbSection:
    project: Optional[str] = None  # a W&B project: logs the run there (None: off)
    entity: Optional[str] = None  # a W&B team or user (default: the logged-in user's)
    name: Optional[str] = None  # the W&B run's display name (default: run_name)
    mode: str = "online"  # online | offline (files under runs/<run>/wandb, `wandb sync` later) | disabled


@dataclasses.dataclass(frozen=True)
class TrackingSection:
    wandb: WandbSection = WandbSection()


WANDB_MODES = ("online", "offline", "disabled")
LR_SCHEDULES = ("linear", "cosine")


@dataclasses.dataclass(frozen=True)
class Config:
    run_name: str = "default"
    runs_dir: str = "runs"
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    sampling: SamplingSection = SamplingSection()
    train: TrainSection = TrainSection()
    sft: SftSection = SftSection()
    study: StudySection = StudySection()
    mesh: MeshSection = MeshSection()
    distributed: DistributedSection = DistributedSection()
    tracking: TrackingSection = TrackingSection()

    @property
    def run_dir(self) -> str:
        return os.path.join(self.runs_dir, self.run_name)

    def iter_dir(self, t: int) -> str:
        return os.path.join(self.run_dir, f"iter{t}")

    def sft_dir(self, init: str = "base") -> str:
        """runs/<run>/sft (SFT of model.name: θ0 with model.init=sft), or sft_from_iter<t> (more SFT
        from θt, the paper's baseline), for init "base" or "iter<t>"."""
        return os.path.join(self.run_dir, "sft" if init == "base" else f"sft_from_{init}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lr_for_iter(learning_rate: float, learning_rates, t: int) -> float:
    """Iteration t's learning rate: learning_rates[t] (the last entry for later iterations), or
    learning_rate when the list is empty."""
    if not learning_rates:
        return float(learning_rate)
    return float(learning_rates[min(t, len(learning_rates) - 1)])


class ConfigError(ValueError):
    """Bad config values, all of them: each line names the key, the value, where it came from (the
    YAML file and line, or the --set) and what is allowed."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(problems[0] if len(problems) == 1 else
                         f"{len(problems)} config errors:\n  " + "\n  ".join(problems))


def load_config(path: Optional[str] = None, overrides: typing.Sequence[str] = ()) -> Config:
    """The config of a YAML file with dotted `key=value` overrides, type-checked and validated in one
    pass; every problem found is reported at once (ConfigError)."""
    raw: dict = {}
    sources: dict[str, str] = {}  # dotted key -> "file:line" or "--set key=value"
    if path:
        if os.path.isdir(path):
            raise ConfigError([f"--config {path}: a directory; expected a YAML file (see configs/)"])
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"config {path} not found (see configs/ for the shipped ones)") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else path
            raise ConfigError([f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})"]) from None
        if not isinstance(raw, dict):
            raise ConfigError([f"{path}: expected a mapping of sections at the top level"])
        sources.update(_yaml_lines(yaml.compose(text), path, ""))
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError([f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.learning_rate=1e-5"])
        node = raw
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"--set {item}: {'.'.join(parts[:i + 1])} is a value, not a section"])
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            node[parts[-1]] = value
        sources[".".join(parts)] = f"--set {item}"
    problems: list[str] = []
    cfg = _build(Config, raw, "", _Where(sources, path or "--set"), problems)
    if not problems:
        problems = [f"{_Where(sources, path or 'defaults')(key)}: {key}={value!r}: {allowed}"
                    for key, value, allowed in validate(cfg)]
    if problems:
        raise ConfigError(problems)
    return cfg


def validate(cfg: Config) -> list[tuple[str, Any, str]]:
    """(key, value, what is allowed) for every value out of range or inconsistent with another."""
    bad = []

    def need(ok: bool, key: str, value, allowed: str):
        if not ok:
            bad.append((key, value, allowed))

    m, d, s, t, mesh = cfg.model, cfg.data, cfg.sampling, cfg.train, cfg.mesh
    dtypes = ("float32", "bfloat16", "float16")
    need(m.dtype in dtypes, "model.dtype", m.dtype, f"one of {', '.join(dtypes)}")
    need(m.param_dtype in dtypes, "model.param_dtype", m.param_dtype, f"one of {', '.join(dtypes)}")
    need(m.remat in ("none", "full", "dots"), "model.remat", m.remat, "one of none, full, dots")
    need(m.attn_block >= 0, "model.attn_block", m.attn_block, ">= 0 (0: one block)")
    need(m.attention in ATTENTION, "model.attention", m.attention, f"one of {', '.join(ATTENTION)}")
    need(m.init in ("base", "sft"), "model.init", m.init,
         "base (iteration 0 starts from model.name) or sft (from runs/<run>/sft/model)")
    need(m.chat_template is None or is_chat_template(m.chat_template),
         "model.chat_template", m.chat_template, f"one of {', '.join(CHAT_TEMPLATES)} or an existing Jinja file")
    lo = m.lora
    need(lo.rank >= 0, "model.lora.rank", lo.rank, ">= 0 (0: full fine-tuning)")
    need(lo.alpha > 0, "model.lora.alpha", lo.alpha, "> 0")
    need(0.0 <= lo.dropout < 1.0, "model.lora.dropout", lo.dropout, "in [0, 1)")
    need(bool(lo.targets) and len(set(lo.targets)) == len(lo.targets) and set(lo.targets) <= set(LORA_TARGETS),
         "model.lora.targets", list(lo.targets), f"a list of distinct names among {', '.join(LORA_TARGETS)}")
    need(m.base_dtype is None or m.base_dtype in BASE_DTYPES, "model.base_dtype", m.base_dtype,
         f"one of {', '.join(BASE_DTYPES)}")
    need(m.base_dtype is None or lo.rank > 0, "model.base_dtype", m.base_dtype,
         "only with LoRA (model.lora.rank > 0): full fine-tuning trains every weight in model.param_dtype")
    need(d.name in ("sharegpt", "ultrachat_200k"), "data.name", d.name, "sharegpt or ultrachat_200k")
    need(d.num_prompts >= 1, "data.num_prompts", d.num_prompts, ">= 1")
    need(d.num_eval_prompts >= 1, "data.num_eval_prompts", d.num_eval_prompts, ">= 1")
    need(0 < d.max_prompt_length < d.max_length, "data.max_prompt_length", d.max_prompt_length,
         f">= 1 and < data.max_length ({d.max_length}): responses get max_length - max_prompt_length tokens")
    need(0.0 <= d.max_bad_fraction < 1.0, "data.max_bad_fraction", d.max_bad_fraction, "in [0, 1)")
    need(s.max_new_tokens >= 1, "sampling.max_new_tokens", s.max_new_tokens, ">= 1")
    need(s.greedy or s.temperature > 0, "sampling.temperature", s.temperature,
         "> 0 (for deterministic sampling set sampling.greedy=true instead)")
    need(0.0 < s.top_p <= 1.0, "sampling.top_p", s.top_p, "in (0, 1] (1: off)")
    need(s.top_k >= 0, "sampling.top_k", s.top_k, ">= 0 (0: off)")
    need(s.batch_size >= 1, "sampling.batch_size", s.batch_size, ">= 1")
    need(s.decode_phases >= 1, "sampling.decode_phases", s.decode_phases, ">= 1")
    need(s.layout in DECODE_LAYOUTS, "sampling.layout", s.layout, f"one of {', '.join(DECODE_LAYOUTS)}")
    need(s.chunk_size >= 1, "sampling.chunk_size", s.chunk_size, ">= 1")
    need(t.beta > 0, "train.beta", t.beta, "> 0 (the paper: 0.1)")
    need(t.loss_type in ("sigmoid", "hinge", "ipo"), "train.loss_type", t.loss_type, "one of sigmoid, hinge, ipo")
    need(t.optimizer in ("rmsprop", "adamw"), "train.optimizer", t.optimizer, "rmsprop or adamw")
    need(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "> 0 (the paper: 5e-7)")
    need(t.lr_schedule in LR_SCHEDULES, "train.lr_schedule", t.lr_schedule, "linear or cosine")
    need(all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in t.learning_rates),
         "train.learning_rates", list(t.learning_rates), "a list of numbers > 0, one per iteration")
    need(0.0 <= t.warmup_ratio <= 1.0, "train.warmup_ratio", t.warmup_ratio, "in [0, 1]")
    need(t.epochs >= 1, "train.epochs", t.epochs, ">= 1")
    need(t.global_batch_size >= 1, "train.global_batch_size", t.global_batch_size, ">= 1 (pairs per update)")
    need(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, ">= 1")
    if t.global_batch_size >= 1 and t.grad_accum >= 1:
        need(t.global_batch_size % t.grad_accum == 0, "train.grad_accum", t.grad_accum,
             f"a divisor of train.global_batch_size ({t.global_batch_size})")
    need(t.max_grad_norm >= 0, "train.max_grad_norm", t.max_grad_norm, ">= 0 (0: no clipping)")
    need(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0")
    need(t.opponent_logps in ("precomputed", "in_step"), "train.opponent_logps", t.opponent_logps,
         "precomputed or in_step")
    need(t.vocab_chunk >= 0, "train.vocab_chunk", t.vocab_chunk, ">= 0 (0: the whole vocab at once)")
    need(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, ">= 1 (updates)")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, ">= 1")
    need(t.log_every >= 1, "train.log_every", t.log_every, ">= 1")
    need(0.0 <= t.max_skipped_fraction <= 1.0, "train.max_skipped_fraction", t.max_skipped_fraction, "in [0, 1]")
    f = cfg.sft
    need(f.loss_on in ("assistant", "all"), "sft.loss_on", f.loss_on,
         "assistant (assistant turns and their end-of-turn tokens) or all (every token)")
    need(f.num_conversations >= 0, "sft.num_conversations", f.num_conversations, ">= 0 (0: data.num_prompts)")
    need(f.max_length >= 0, "sft.max_length", f.max_length, ">= 0 (0: data.max_length)")
    need(f.learning_rate > 0, "sft.learning_rate", f.learning_rate, "> 0 (alignment-handbook: 2e-5)")
    need(f.lr_schedule in LR_SCHEDULES, "sft.lr_schedule", f.lr_schedule, "linear or cosine")
    need(0.0 <= f.warmup_ratio <= 1.0, "sft.warmup_ratio", f.warmup_ratio, "in [0, 1]")
    need(f.epochs >= 1, "sft.epochs", f.epochs, ">= 1")
    need(f.optimizer in ("rmsprop", "adamw"), "sft.optimizer", f.optimizer, "adamw or rmsprop")
    need(f.weight_decay >= 0, "sft.weight_decay", f.weight_decay, ">= 0")
    need(f.max_grad_norm >= 0, "sft.max_grad_norm", f.max_grad_norm, ">= 0 (0: no clipping)")
    need(f.global_batch_size >= 1, "sft.global_batch_size", f.global_batch_size, ">= 1 (rows per update)")
    need(f.grad_accum >= 1, "sft.grad_accum", f.grad_accum, ">= 1")
    if f.global_batch_size >= 1 and f.grad_accum >= 1:
        need(f.global_batch_size % f.grad_accum == 0, "sft.grad_accum", f.grad_accum,
             f"a divisor of sft.global_batch_size ({f.global_batch_size})")
    st = cfg.study
    need(st.iterations >= 1, "study.iterations", st.iterations, ">= 1")
    need(st.num_heldout >= 10, "study.num_heldout", st.num_heldout, ">= 10 held-out prompts")
    need(bool(st.seeds) and all(isinstance(x, int) and not isinstance(x, bool) for x in st.seeds)
         and len(set(st.seeds)) == len(st.seeds), "study.seeds", list(st.seeds), "a list of distinct integers")
    need(st.feature_batch >= 1, "study.feature_batch", st.feature_batch, ">= 1")
    need(st.mauve_buckets == 0 or st.mauve_buckets >= 2, "study.mauve_buckets", st.mauve_buckets,
         ">= 2, or 0 for mauve-text's rule (samples / 10)")
    need(st.bootstrap >= 100, "study.bootstrap", st.bootstrap, ">= 100 resamples")
    need(st.task_limit >= 0, "study.task_limit", st.task_limit, ">= 0 (0: every document)")
    w = cfg.tracking.wandb
    need(w.mode in WANDB_MODES, "tracking.wandb.mode", w.mode, f"one of {', '.join(WANDB_MODES)}")
    need(w.project is None or bool(w.project.strip()), "tracking.wandb.project", w.project,
         "a W&B project name, or unset (null) for no tracking")
    for axis in ("data", "fsdp", "tensor"):
        size = getattr(mesh, axis)
        need(size == -1 or size >= 1, f"mesh.{axis}", size, ">= 1, or -1 for all devices left")
    need([mesh.data, mesh.fsdp, mesh.tensor].count(-1) <= 1, "mesh", dataclasses.asdict(mesh),
         "at most one axis -1")
    return bad


class _Where:
    """Where a dotted key's value came from: its own line or --set, else its section's, else the file."""

    def __init__(self, sources: dict, default: str):
        self.sources, self.default = sources, default

    def __call__(self, key: str) -> str:
        while key:
            if key in self.sources:
                return self.sources[key]
            key = key.rpartition(".")[0]
        return self.default


def _yaml_lines(node, path: str, prefix: str) -> dict[str, str]:
    """dotted key -> "path:line" for every key of a composed YAML mapping."""
    out = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            out[key] = f"{path}:{k.start_mark.line + 1}"
            out.update(_yaml_lines(v, path, key + "."))
    return out


def _build(cls, raw, prefix: str, where: _Where, problems: list[str]):
    """cls from a mapping; unknown keys and wrong types are added to `problems` (defaults kept)."""
    section = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        problems.append(f"{where(section)}: {section} must be a mapping of keys, got {raw!r}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            problems.append(f"{where(prefix + str(key))}: unknown key {prefix}{key!r}; known: {', '.join(fields)}")
            continue
        try:
            kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}", where, problems)
        except ValueError as e:
            problems.append(f"{where(prefix + key)}: {e}")
    return cls(**kwargs)


def _coerce(hint, value: Any, key: str, where: _Where, problems: list[str]):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", where, problems)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return tuple(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ValueError(f"{key} must be {hint.__name__}, got {value!r}")
    if hint is float and not isinstance(value, float):
        raise ValueError(f"{key} must be a number, got {value!r}")
    return value
