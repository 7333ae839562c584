"""`spin-jax plan`: compile every program of a SPIN iteration for a TPU slice, with no TPU attached.

    spin-jax plan --config configs/zephyr_ultrachat_tpu.yaml --topology v5p-32

The XLA:TPU compiler (libtpu, installed by `make plan` into .venv/tpu) compiles, from abstract
inputs with the config's shapes (no weights loaded):
    train     the train step in the config's opponent mode, on the whole slice's mesh
    score     the opponent's log-probs of a batch of pairs, on one host's mesh (as generate runs it)
    sample    prefill plus the decode loop at sampling.batch_size, on one host's mesh
and reports, per chip, the compiler's argument / output / alias / temp bytes and their peak against
the chip's HBM, the compile time, FLOPs and HBM bytes per call, and a roofline time and MFU from the
chip's peak bf16 FLOP/s and HBM bandwidth (CHIPS). These are estimates from the compiler's figures,
not measurements on a TPU.

On TPU, training and scoring attention is the Pallas splash kernel (model.attention: auto), so the
memory figures are the kernel's. XLA's cost analysis counts the body of a scan or while loop once,
and a Pallas call not at all. FLOPs and bytes are therefore
taken from copies of each program with the layer and vocab-chunk loops unrolled, at 2 and 3 layers
(per-layer cost = the difference), scaled to the model's depth, times the trip counts of the
outer loops: the micro-batches of a train step, the decode steps of sampling (`corrected_cost`);
those copies run attention on the XLA path, whose blocked causal attention skips about as many
masked keys as the kernel does, and are compiled without XLA:TPU's windowed einsum (its loops of
partial matmuls would be counted once, COST_COMPILER_OPTIONS). Communication is read from the
program that runs (`spin_jax.collectives`), each loop body times its trips.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.metadata
import json
import logging
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from spin_jax import collectives, rundir, scoring, sharding, train
from spin_jax.config import Config
from spin_jax.data import tokenize
from spin_jax.errors import SpinError, UsageError
from spin_jax.model import cache as cache_lib
from spin_jax.model import lora, transformer
from spin_jax.model.config import ModelConfig

log = logging.getLogger(__name__)

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: float
    peak_bf16_flops: float  # dense bf16 FLOP/s
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # what one chip sends per second over all its ICI links (one direction)
    source: str


# Per chip, from Google Cloud's TPU pages (cloud.google.com/tpu/docs/<version>). Google gives ICI
# bandwidth per chip counting both directions; a chip sends at half of it while it receives as much
# (ring collectives do both), so ici_bytes_per_s is half the page's figure. Google's v4 page gives
# no per-chip ICI figure: v4's is from the TPU v4 paper (Jouppi et al., ISCA 2023: 6 links of 50 GB/s
# per direction).
CHIPS = {
    "v4": Chip(32 * GiB, 275e12, 1228e9, 300e9, "cloud.google.com/tpu/docs/v4: 32 GiB HBM2, 275 TFLOP/s bf16, "
               "1228 GB/s; ICI 6 x 50 GB/s per direction (TPU v4 paper)"),
    "v5e": Chip(16 * GiB, 197e12, 819e9, 200e9, "cloud.google.com/tpu/docs/v5e: 16 GiB HBM2, 197 TFLOP/s bf16, "
                "819 GB/s, ICI 400 GB/s both directions"),
    "v5p": Chip(95 * 1e9, 459e12, 2765e9, 600e9, "cloud.google.com/tpu/docs/v5p: 95 GB HBM2e, 459 TFLOP/s bf16, "
                "2765 GB/s, ICI 1200 GB/s both directions"),
    "v6e": Chip(32 * GiB, 918e12, 1640e9, 400e9, "cloud.google.com/tpu/docs/v6e: 32 GiB HBM, 918 TFLOP/s bf16, "
                "1640 GB/s, ICI 800 GB/s both directions"),
}

# Friendly slice name -> (chip, libtpu topology, chip config, chips per host). v4 and v5p count
# TensorCores in their names (v5p-32 = 16 chips) and run one megacore device per chip.
SLICES = {
    **{f"v4-{2 * n}": ("v4", f"v4:{t}", "megacore", (2, 2, 1)) for n, t in
       ((4, "2x2x1"), (8, "2x2x2"), (16, "2x2x4"), (32, "2x4x4"))},
    **{f"v5p-{2 * n}": ("v5p", f"v5:{t}", "megacore", (2, 2, 1)) for n, t in
       ((4, "2x2x1"), (8, "2x2x2"), (16, "2x2x4"), (32, "2x4x4"))},
    "v5e-1": ("v5e", "v5e:1x1", "default", (1, 1, 1)),
    "v5e-4": ("v5e", "v5e:2x2", "default", (2, 2, 1)),
    "v5e-8": ("v5e", "v5e:2x4", "default", (2, 4, 1)),
    "v5e-16": ("v5e", "v5e:4x4", "default", (2, 2, 1)),
    "v6e-1": ("v6e", "v6e:1x1", "default", (1, 1, 1)),
    "v6e-4": ("v6e", "v6e:2x2", "default", (2, 2, 1)),
    "v6e-8": ("v6e", "v6e:2x4", "default", (2, 4, 1)),
}
ALIASES = {"colab-v5e-1": "v5e-1", "colab-v6e-1": "v6e-1"}  # Colab's TPU runtimes


@dataclasses.dataclass
class ProgramPlan:
    name: str
    mesh: dict
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    compile_seconds: float
    flops: float  # per chip and call, corrected for loops
    hbm_bytes: float  # per chip and call, corrected for loops
    model_flops: float  # 6 N tokens (train) or 2 N tokens (score, sample) per chip and call
    chip: Chip
    collective_bytes: dict = dataclasses.field(default_factory=dict)  # kind -> buffer bytes per chip and call
    ici_bytes: float = float("nan")  # bytes one chip sends over ICI per call (ring collectives)
    largest_collective: str = "-"
    tokens: int = 0  # sample: tokens generated per call (batch x max_new_tokens), for tokens/s
    decode_steps: int = 0  # sample: the decode steps of a call

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs not aliased to them + temporaries: the program's HBM at its peak."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.chip.hbm_bytes

    @property
    def bounds(self) -> dict:
        """Seconds per call at each limit: compute, HBM bandwidth, ICI bandwidth."""
        return {"compute": self.flops / self.chip.peak_bf16_flops, "HBM": self.hbm_bytes / self.chip.hbm_bytes_per_s,
                "ICI": self.ici_bytes / self.chip.ici_bytes_per_s}

    @property
    def bound(self) -> str:
        """Which limit sets the roofline time."""
        return max(self.bounds.items(), key=lambda kv: kv[1] if kv[1] == kv[1] else -1.0)[0]

    @property
    def roofline_seconds(self) -> float:
        """max(FLOPs / peak, HBM bytes / bandwidth, ICI bytes / ICI bandwidth), nan if any is unknown."""
        values = list(self.bounds.values())
        return float("nan") if any(v != v for v in values) else max(values)

    @property
    def roofline_mfu(self) -> float:
        return self.model_flops / (self.roofline_seconds * self.chip.peak_bf16_flops)

    @property
    def decode_tokens_per_s(self) -> float:
        """sample: tokens per second of one host's program at the roofline."""
        return self.tokens / self.roofline_seconds

    @property
    def floor_tokens_per_s(self) -> float:
        """sample: tokens per second if each decode step only read its arguments (weights and KV
        cache) once from HBM: the memory-bandwidth floor of decoding."""
        return self.tokens / (self.decode_steps * self.argument_bytes / self.chip.hbm_bytes_per_s)


@dataclasses.dataclass
class Compiled:
    """What a plan reads from one XLA:TPU compile: the optimized HLO, the memory figures, the cost
    analysis, and how long the compile took."""
    text: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    flops: float
    bytes_accessed: float
    seconds: float
    cached: bool = False

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def plan_cache_dir() -> Optional[str]:
    """$SPIN_JAX_PLAN_CACHE (off: none), else ~/.cache/spin_jax/plan."""
    path = os.environ.get("SPIN_JAX_PLAN_CACHE", "")
    if rundir.cache_off(path):
        return None
    return path or rundir.cache_home("plan")


def _compile_key(lowered, devices, compiler_options) -> str:
    """The program as lowered (StableHLO with its shardings and donations), the devices it is laid
    out on (kind, id, coordinates), the compiler options and flags, and jax, jaxlib and libtpu's
    versions: what JAX's own cache key covers."""
    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    h = hashlib.sha256()
    for part in (lowered.as_text(), json.dumps(compiler_options or {}, sort_keys=True, default=str),
                 *(f"{d.platform} {d.device_kind} {d.id} {getattr(d, 'coords', '')} {getattr(d, 'core_on_chip', '')}"
                   for d in devices),
                 *(version(x) for x in ("jax", "jaxlib", "libtpu", "libtpu-nightly")),
                 os.environ.get("XLA_FLAGS", ""), os.environ.get("LIBTPU_INIT_ARGS", "")):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def compile_program(lowered, devices=None, compiler_options=None) -> Compiled:
    """lowered.compile(), or what an earlier compile of the same program stored in the plan cache.
    JAX's persistent compilation cache cannot serve a compile-only TPU client (it cannot load an
    executable without a TPU), and a plan needs only the compiler's text and figures, so those are
    stored, gzipped JSON per program. Without `devices` (which the key needs) nothing is cached.
    Raises what the compile raises (a program too big for the chip is never stored)."""
    root = plan_cache_dir() if devices is not None else None
    path = os.path.join(root, _compile_key(lowered, devices, compiler_options) + ".json.gz") if root else None
    if path and os.path.exists(path):
        try:
            with gzip.open(path, "rt") as f:
                return Compiled(**json.load(f), cached=True)
        except (OSError, ValueError, TypeError, EOFError):
            log.info(f"plan cache entry {path} unreadable: compiling again")
    t0 = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options)
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    out = Compiled(compiled.as_text(), mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                   mem.temp_size_in_bytes, float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
                   seconds)
    if path:
        try:
            os.makedirs(root, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with gzip.open(tmp, "wt") as f:
                json.dump({k: v for k, v in dataclasses.asdict(out).items() if k != "cached"}, f)
            os.replace(tmp, path)
        except OSError as e:  # a read-only or full cache folder costs a compile next time, nothing else
            log.info(f"plan cache {root} not written ({e})")
    return out


def topology(name: str):
    """(chip kind, Chip, list of TPU device descriptions) of a friendly slice name."""
    name = ALIASES.get(name, name)
    if name not in SLICES:
        raise UsageError(f"--topology {name!r}: expected one of {', '.join([*SLICES, *ALIASES])}")
    kind, topo_name, chip_config, per_host = SLICES[name]
    # A topology description opens no TPU: several plans (or a plan beside a run on a TPU VM) may
    # load libtpu at once, which its /tmp/libtpu_lockfile otherwise refuses.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topo_name, chip_config_name=chip_config,
                                            chips_per_host_bounds=per_host, num_slices=1)
    except Exception as e:  # no libtpu, or it refused the topology
        raise SpinError(f"cannot describe TPU topology {topo_name} ({(str(e).splitlines() or [''])[0][:200]}); "
                        "run it as `make plan CONFIG=... TOPOLOGY=...`, which installs the TPU compiler (libtpu) "
                        "into .venv/tpu and puts it on PYTHONPATH for this command only") from None
    return kind, CHIPS[kind], list(desc.devices)


def plan(cfg: Config, model_cfg: ModelConfig, slice_name: str, layers: Optional[int] = None,
         programs=("train", "score", "sample"), costs: bool = True) -> list[ProgramPlan]:
    """Compile `programs` for the slice; `layers` compiles a slice of the model's depth. Without
    `costs`, the copies that count FLOPs and bytes are not compiled (memory only, ~3x faster)."""
    kind, chip, devices = topology(slice_name)
    m = model_cfg.replace(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat,
                          attn_block=cfg.model.attn_block,
                          attention="splash" if cfg.model.attention == "auto" else cfg.model.attention)
    if cfg.model.lora.rank:  # the frozen base in model.base_dtype (int8 / nf4: quantized), adapters in float32
        m = lora.base_config(m, cfg.model)
    if layers:
        m = m.replace(num_layers=layers)
    hosts = sorted({d.process_index for d in devices})
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    local = sharding.make_local_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor,
                                     devices=[d for d in devices if d.process_index == hosts[0]],
                                     num_processes=len(hosts))
    check_batches(cfg, mesh, local, sft="sft" in programs)
    builders = {"train": (train_program, mesh), "sft": (sft_program, mesh), "score": (score_program, local),
                "sample": (functools.partial(sample_program, memory_bytes=chip.hbm_bytes), local)}
    out = []
    for name in programs:
        build, program_mesh = builders[name]
        t0 = time.perf_counter()
        program = build(cfg, m, program_mesh)
        pdevices = list(program_mesh.devices.flat)
        try:
            compiled = compile_program(program.lower(), pdevices)
        except Exception as e:  # XLA:TPU refuses a program whose temporaries exceed the chip's HBM
            needed = _out_of_memory_bytes(str(e))
            if needed is None:
                raise
            out.append(ProgramPlan(name, dict(program_mesh.shape), 0, 0, 0, needed, time.perf_counter() - t0,
                                   float("nan"), float("nan"), program.model_flops / program_mesh.size, chip))
            log.info(f"{name} does not fit a {kind} chip: the compiler needs {needed / 1e9:.1f} GB of temporaries")
            continue
        flops, hbm = (corrected_cost(program, m.num_layers, COST_COMPILER_OPTIONS, pdevices) if costs
                      else (float("nan"), float("nan")))
        # what the program that runs moves between chips, every loop body times its trips
        found = collectives.collectives(compiled.text, unknown_trips=program.unknown_trips)
        big = collectives.largest(found)
        out.append(ProgramPlan(name, program.mesh or dict(program_mesh.shape), compiled.argument_bytes,
                               compiled.output_bytes, compiled.alias_bytes, compiled.temp_bytes, compiled.seconds,
                               flops, hbm,
                               program.model_flops / program_mesh.size, chip, collectives.totals(found),
                               sum(collectives.totals(found, link=True).values()),
                               collectives.describe(big) if big else "-", program.tokens, program.decode_steps))
        log.info(f"{'loaded' if compiled.cached else 'compiled'} {name} for {slice_name} "
                 f"({'from the plan cache, compiled' if compiled.cached else 'in'} {compiled.seconds:.0f}s)")
    return out


def _out_of_memory_bytes(message: str) -> Optional[int]:
    """The bytes of temporaries XLA:TPU asked for when it refused a program for lack of HBM."""
    import re

    if "Ran out of memory" not in message and "RESOURCE_EXHAUSTED" not in message:
        return None
    found = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", message)
    if not found:
        return None
    return int(float(found.group(1)) * {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[found.group(2)])


def check_batches(cfg: Config, mesh, local, sft: bool = False) -> None:
    """Batches must split evenly over the chips that share them (data x fsdp)."""
    problems = []
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.train.global_batch_size // cfg.train.grad_accum
    if micro % ways:
        problems.append(f"a train micro-batch of {micro} pairs (train.global_batch_size / train.grad_accum) does "
                        f"not split over the {ways} chips of mesh {dict(mesh.shape)}: use a multiple of {ways}")
    sft_micro = cfg.sft.global_batch_size // cfg.sft.grad_accum
    if sft and sft_micro % ways:
        problems.append(f"an SFT micro-batch of {sft_micro} rows (sft.global_batch_size / sft.grad_accum) does "
                        f"not split over the {ways} chips of mesh {dict(mesh.shape)}: use a multiple of {ways}")
    local_ways = local.shape["data"] * local.shape["fsdp"]
    if cfg.sampling.batch_size % local_ways:
        problems.append(f"sampling.batch_size={cfg.sampling.batch_size} does not split over the {local_ways} chips "
                        f"of one host: use a multiple of {local_ways}")
    if problems:
        raise UsageError("; ".join(problems))


@dataclasses.dataclass
class Program:
    """A program to compile, and how to count its cost: `parts` are (lower(model config) -> a
    lowered program, how many times it runs per call). The scan over layers is counted once by
    XLA's cost analysis, so each part is compiled unrolled at 2 and 3 layers and extrapolated
    (`corrected_cost`)."""
    lower: Callable[[], object]  # the program at the model's full depth
    parts: list
    model_flops: float  # 2 N per token forward, 6 N forward + backward (N = the model's parameters)
    unknown_trips: float = 1.0  # runs of each loop whose count depends on the data (the decode phases)
    tokens: int = 0  # sample: tokens generated per call
    decode_steps: int = 0
    mesh: Optional[dict] = None  # the mesh it runs on when it is not the one it was built for (decode)


# XLA:TPU turns an all-gather or reduce-scatter feeding a matmul into a loop of collective-permutes
# and partial matmuls (windowed einsum), whose body the cost analysis counts once: the cost copies
# are compiled without it, so every matmul is counted (the same partitioning, the same bytes moved).
COST_COMPILER_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                         "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def corrected_cost(program: Program, num_layers: int, compiler_options=None,
                   devices=None) -> tuple[float, float]:
    """(FLOPs, HBM bytes) per chip of one call at `num_layers` layers, each loop body counted as
    often as it runs. Each part is compiled at 2 and 3 layers with its layer and vocab-chunk loops
    unrolled (ModelConfig.unroll_loops), cost(L) = cost(2) + (L - 2) (cost(3) - cost(2)), times
    the part's trips (the loops left: micro-batches, decode steps). (A 1-layer program is fused
    differently from deeper ones, so it is not used.)"""
    flops = hbm = 0.0
    for lower_at, trips in program.parts:
        c2, c3 = (compile_program(lower_at(n, unroll=True), devices, compiler_options) for n in (2, 3))
        flops += trips * (c2.flops + (num_layers - 2) * (c3.flops - c2.flops))
        hbm += trips * (c2.bytes_accessed + (num_layers - 2) * max(c3.bytes_accessed - c2.bytes_accessed, 0.0))
    return flops, hbm


def _at_depth(m: ModelConfig, layers: int, unroll: bool) -> ModelConfig:
    """The model at `layers` layers; the unrolled copies that count the cost run attention on the
    XLA path, because the kernel's custom call carries no cost figures (its FLOPs would be missing)."""
    return m.replace(num_layers=layers, unroll_loops=unroll, attention="xla" if unroll else m.attention)


def matmul_params(m: ModelConfig) -> tuple[int, int]:
    """(parameters a token's layers multiply by, parameters of the output projection D x V)."""
    head = m.hidden_size * m.vocab_size
    embed = m.vocab_size * m.hidden_size
    return m.num_params() - embed - (0 if m.tie_embeddings else head) - m.hidden_size, head


def _lengths(cfg: Config) -> tuple[int, int]:
    d = cfg.data
    return tokenize.bucket(d.max_prompt_length), tokenize.bucket(d.max_length - d.max_prompt_length)


def _model_params(cfg: Config, mc: ModelConfig, mesh):
    """The abstract params of the model as the opponent runs it (with LoRA: the frozen base in
    model.base_dtype, quantized for int8 / nf4), sharded by the rule table."""
    shapes = lora.base_shapes(mc, cfg.model.base_dtype) if cfg.model.lora.rank else transformer.param_shapes(mc)
    return sharding.abstract(shapes, transformer.param_shardings(mc, mesh, shapes))


def _spin_batch(shardings, lead: tuple, prompts: int, p: int, r: int, with_logps: bool):
    def spec(shape, dtype, sh):
        return jax.ShapeDtypeStruct(lead + shape, dtype, sharding=sh)

    sh = shardings
    return tokenize.SpinBatch(
        prompt_tokens=spec((prompts, p), jnp.int32, sh.prompt_tokens),
        prompt_valid=spec((prompts, p), jnp.bool_, sh.prompt_valid),
        prompt_positions=spec((prompts, p), jnp.int32, sh.prompt_positions),
        tokens=spec((2 * prompts, r), jnp.int32, sh.tokens), valid=spec((2 * prompts, r), jnp.bool_, sh.valid),
        positions=spec((2 * prompts, r), jnp.int32, sh.positions),
        opponent_logps=spec((2 * prompts,), jnp.float32, sh.opponent_logps) if with_logps else None)


def _train_state(cfg: Config, mc: ModelConfig, tc, mesh):
    """(optimizer, state shapes, abstract sharded state) of a train step: the whole params, or with
    LoRA the adapters."""
    lo = cfg.model.lora
    tx, _ = train.make_optimizer(tc, 1000, tc.learning_rate)
    trained = lora.adapter_shapes(mc, lo.targets, lo.rank) if lo.rank else transformer.param_shapes(mc)
    shapes = jax.eval_shape(lambda prm: train.init_state(prm, tx), trained)
    return tx, shapes, sharding.abstract(shapes, train.state_shardings(mc, mesh, shapes, tx))


def train_program(cfg: Config, m: ModelConfig, mesh) -> Program:
    """The train step on the whole slice; its scan over micro-batches runs train.grad_accum times."""
    tc = cfg.train
    in_step = tc.opponent_logps == "in_step"
    p, r = _lengths(cfg)
    a, b = tc.grad_accum, tc.global_batch_size // tc.grad_accum

    lo = cfg.model.lora

    def lower_at(layers: int, unroll: bool = False):
        mc = _at_depth(m, layers, unroll)
        tx, shapes, state = _train_state(cfg, mc, tc, mesh)
        batch = _spin_batch(train.batch_shardings(mesh, not in_step), (a,), b, p, r, not in_step)
        if not lo.rank:
            opponent = state.params if in_step else None
            return train.make_train_step(mc, tc, tx, mesh, shapes).lower(state, opponent, batch)
        base = _model_params(cfg, mc, mesh)
        step = train.make_train_step(mc, tc, tx, mesh, shapes, base)
        return step.lower(state, None, batch, base)

    layer_params, head = matmul_params(m)
    tokens, scored = tc.global_batch_size * (p + 2 * r), tc.global_batch_size * 2 * r  # each prompt once
    # forward and backward (LoRA: no weight gradients of the base), and the opponent's forward in the step
    passes = (4 if lo.rank else 6) + (2 if in_step else 0)
    return Program(lambda: lower_at(m.num_layers), [(lower_at, a)], passes * (layer_params * tokens + head * scored))


def sft_program(cfg: Config, m: ModelConfig, mesh) -> Program:
    """SFT's step (`spin_jax.sft`) on the whole slice: sft.global_batch_size rows of sft.max_length
    (or data.max_length) tokens, packed or not (the same shapes), in sft.grad_accum micro-batches."""
    from spin_jax import sft

    f = cfg.sft
    tc = f.train_section(cfg.train)
    width = tokenize.bucket(f.max_length or cfg.data.max_length)
    a, b = f.grad_accum, f.global_batch_size // f.grad_accum
    lo = cfg.model.lora

    def lower_at(layers: int, unroll: bool = False):
        mc = _at_depth(m, layers, unroll)
        tx, shapes, state = _train_state(cfg, mc, tc, mesh)
        objective = sft.SftObjective(mc, tc)
        sh = objective.shardings(mesh)
        spec = lambda dtype, s: jax.ShapeDtypeStruct((a, b, width), dtype, sharding=s)  # noqa: E731
        batch = sft.SftBatch(tokens=spec(jnp.int32, sh.tokens), positions=spec(jnp.int32, sh.positions),
                             segments=spec(jnp.int32, sh.segments), targets=spec(jnp.bool_, sh.targets))
        if not lo.rank:
            return train.make_train_step(mc, tc, tx, mesh, shapes, objective=objective).lower(state, None, batch)
        base = _model_params(cfg, mc, mesh)
        return train.make_train_step(mc, tc, tx, mesh, shapes, base, objective).lower(state, None, batch, base)

    layer_params, head = matmul_params(m)
    tokens = f.global_batch_size * width
    passes = 4 if lo.rank else 6  # forward and backward (LoRA: no weight gradients of the base)
    return Program(lambda: lower_at(m.num_layers), [(lower_at, a)], passes * (layer_params + head) * tokens)


def score_program(cfg: Config, m: ModelConfig, mesh) -> Program:
    """The opponent's log-probs of 2 * sampling.batch_size responses (a batch of pairs), one host."""
    rows = 2 * cfg.sampling.batch_size
    p, r = _lengths(cfg)

    def lower_at(layers: int, unroll: bool = False):
        mc = _at_depth(m, layers, unroll)
        fn = scoring.logps_fn(mc, mesh, cfg.train.vocab_chunk, rows, group=2)
        params = _model_params(cfg, mc, mesh)
        return fn.lower(params, _spin_batch(scoring.grouped_shardings(mesh, rows, 2), (), rows // 2, p, r, False))

    layer_params, head = matmul_params(m)
    model_flops = 2 * (layer_params * rows // 2 * (p + 2 * r) + head * rows * r)
    return Program(lambda: lower_at(m.num_layers), [(lower_at, 1)], model_flops)


def sample_program(cfg: Config, m: ModelConfig, mesh, memory_bytes: Optional[float] = None) -> Program:
    """One batch of sampling on one host: prefill, then max_new_tokens - 1 decode steps in while
    loops (each body counted once by the cost analysis, so the cost is prefill + the steps). The
    decode layout is the sampler's (`sampling.decode_mesh`), chosen for the model at full depth
    and a chip of `memory_bytes`; the cost copies decode in the same layout."""
    from spin_jax.sampling import Sampler, SamplingParams, decode_windows

    s = cfg.sampling
    p, _ = _lengths(cfg)
    length = p + s.max_new_tokens
    sp = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                        greedy=s.greedy, stop_ids=(0,))
    full = Sampler(m, mesh, batch_size=s.batch_size, param_shapes=_model_params(cfg, m, mesh), layout=s.layout,
                   memory_bytes=memory_bytes)
    layout = full.layout

    def inputs(layers: int, unroll: bool = False):
        mc = _at_depth(m, layers, unroll)
        sampler = Sampler(mc, mesh, batch_size=s.batch_size, decode_phases=s.decode_phases,
                          param_shapes=_model_params(cfg, mc, mesh), layout=layout)
        cache_sh = sampler.cache_shardings(length)
        cache = sharding.abstract(jax.eval_shape(lambda: cache_lib.init_cache(mc, s.batch_size, length)), cache_sh)
        return mc, sampler, cache, cache_sh, sharding.batch_sharding(sampler.mesh, 2, s.batch_size)

    def whole(layers: int):
        mc, sampler, cache, _, row = inputs(layers)
        rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(sampler.mesh))
        tokens = jax.ShapeDtypeStruct((s.batch_size, p), jnp.int32, sharding=row)
        valid = jax.ShapeDtypeStruct((s.batch_size, p), jnp.bool_, sharding=row)
        return sampler.program(sp).lower(sampler.param_shapes, cache, tokens, valid, rng)

    def step(layers: int, t: int, unroll: bool = False):  # the prefill (t = p) or a decode step (t = 1)
        mc, sampler, cache, cache_sh, row = inputs(layers, unroll)
        shape = jax.ShapeDtypeStruct((s.batch_size, t), jnp.int32, sharding=row)
        ok = jax.ShapeDtypeStruct((s.batch_size, t), jnp.bool_, sharding=row)

        def run(prm, c, tok, pos, v):  # as sample_batch: logits of the last position only
            hidden, c = transformer.forward_hidden(prm, mc, tok, pos, v, cache=c)
            return transformer.logits_from_hidden(prm, mc, hidden[:, -1]), c

        return jax.jit(sharding.traced_on(sampler.mesh, run),
                       in_shardings=(sampler.param_sharding, cache_sh, row, row, row),
                       donate_argnums=(1,)).lower(sampler.param_shapes, cache, shape, shape, ok)

    parts = [(lambda n, unroll: step(n, p, unroll), 1), (lambda n, unroll: step(n, 1, unroll), s.max_new_tokens - 1)]
    layer_params, head = matmul_params(m)
    model_flops = 2 * s.batch_size * (layer_params * (p + s.max_new_tokens) + head * s.max_new_tokens)
    steps = s.max_new_tokens - 1  # decode steps, run by one while loop per phase
    loops = len(decode_windows(p, length, s.decode_phases))
    return Program(lambda: whole(m.num_layers), parts, model_flops, unknown_trips=steps / loops,
                   tokens=s.batch_size * s.max_new_tokens, decode_steps=max(steps, 1),
                   mesh={"layout": layout, **dict(full.mesh.shape)})


# ----------------------------------------------------------------------------------------------
# Report


def advice(p: ProgramPlan, cfg: Config) -> str:
    """What to change, leaving out what the config already does."""
    tips = []
    if p.name in ("train", "sft"):
        if p.mesh.get("data", 1) > 1:
            tips.append("shard the parameters over every chip (mesh.fsdp=-1, mesh.data=1)")
        if cfg.model.remat != "full":
            tips.append("set model.remat=full")
        section = cfg.train if p.name == "train" else cfg.sft
        micro = section.global_batch_size // section.grad_accum
        if micro > p.mesh.get("data", 1) * p.mesh.get("fsdp", 1):
            tips.append(f"raise {p.name}.grad_accum (now {section.grad_accum}) for smaller micro-batches")
        if cfg.train.vocab_chunk == 0:
            tips.append("set train.vocab_chunk (e.g. 8192)")
        tips.append("use a slice with more chips or more HBM per chip")
    else:
        tips.append(f"lower sampling.batch_size (now {cfg.sampling.batch_size})")
        if p.name == "score" and cfg.train.vocab_chunk == 0:
            tips.append("set train.vocab_chunk (e.g. 8192)")
        tips.append("use a chip with more HBM")
    return "; ".join(tips)


def format_plan(plans: list[ProgramPlan], slice_name: str, kind: str) -> str:
    chip = plans[0].chip
    lines = [f"plan for {slice_name} ({kind}: {chip.hbm_bytes / 1e9:.1f} GB HBM, "
             f"{chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bytes_per_s / 1e9:.0f} GB/s HBM, "
             f"{chip.ici_bytes_per_s / 1e9:.0f} GB/s ICI sent per chip; {chip.source})",
             f"{'program':<8}{'mesh':<34}{'args':>8}{'out':>8}{'alias':>8}{'temp':>8}{'peak':>8}{'HBM':>7}"
             f"{'fits':>6}{'compile':>9}{'TFLOP':>9}{'HBM GB':>9}{'ICI GB':>9}{'roofline':>10}{'bound':>8}{'MFU':>6}"]
    notes = []
    for p in plans:
        gb = lambda x: f"{x / 1e9:.2f}"  # noqa: E731
        costed = p.flops == p.flops  # NaN when the compiler refused the program, or with --memory-only
        ici = f"{p.ici_bytes / 1e9:>9.2f}" if p.ici_bytes == p.ici_bytes else f"{'-':>9}"
        cost = (f"{p.flops / 1e12:>9.2f}{p.hbm_bytes / 1e9:>9.2f}{ici}{p.roofline_seconds:>9.3f}s{p.bound:>8}"
                f"{p.roofline_mfu:>6.0%}" if costed else f"{'-':>9}{'-':>9}{ici}{'-':>10}{'-':>8}{'-':>6}")
        lines.append(f"{p.name:<8}{str(p.mesh):<34}{gb(p.argument_bytes):>8}{gb(p.output_bytes):>8}"
                     f"{gb(p.alias_bytes):>8}{gb(p.temp_bytes):>8}{gb(p.peak_bytes):>8}{gb(chip.hbm_bytes):>7}"
                     f"{'yes' if p.fits else 'NO':>6}{p.compile_seconds:>8.0f}s{cost}")
        if p.collective_bytes:
            kinds = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in p.collective_bytes.items() if v) or "none"
            notes.append(f"{p.name}: collectives per chip and call (GB): {kinds}; largest: {p.largest_collective}")
        if p.name == "sample" and costed and p.tokens:
            notes.append(f"sample: {p.decode_tokens_per_s:,.0f} tokens/s per host at the roofline; "
                         f"{p.floor_tokens_per_s:,.0f} tokens/s at the HBM floor (weights and KV cache read once "
                         "per decode step)")
    lines += notes
    lines.append("per chip and call; FLOPs and HBM bytes corrected for loop bodies, collectives read from the compiled "
                 "program with each loop body times its trips; roofline = max(FLOPs / peak, HBM bytes / bandwidth, "
                 "ICI bytes / ICI bandwidth), bound = the limit that sets it: an estimate from the TPU compiler's "
                 "figures, not a measurement on a TPU")
    return "\n".join(lines)
