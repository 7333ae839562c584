"""SPIN training: the pure loss step with a frozen opponent, the optimizer, and a small Trainer
(checkpoints, metrics, preemption).

    step = make_train_step(cfg, tcfg, tx, mesh, state_shapes)
    state, metrics = step(state, opponent_params, batch)

A step's batch is a `SpinBatch` (data.tokenize) with a leading micro-batch axis for gradient
accumulation: prompts [A, b, P] and responses [A, 2b, R], where response row 2i is prompt i's real
response and row 2i + 1 the opponent's generated one. Each prompt is computed once for both of its
responses (transformer.forward_shared_prefix) and logits are computed for response positions only.
A contiguous slice of b' prompts and their 2b' responses holds whole pairs, so each host can hand
in its own slice.
The opponent's log-probs come either from `opponent_params` inside the step (opponent_logps:
in_step, under stop_gradient) or from `batch.opponent_logps` [A, 2b], computed once per iteration
right after sampling (precomputed: `opponent_params` is None and no second model is in memory);
both give the same loss.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from spin_jax import loss as loss_lib
from spin_jax import rundir, scoring, sharding
from spin_jax.config import TrainSection
from spin_jax.data.tokenize import SpinBatch
from spin_jax.errors import Preempted, TooManySkipped
from spin_jax.model import lora, transformer
from spin_jax.model.config import ModelConfig

log = logging.getLogger(__name__)


@struct.dataclass
class TrainState:
    step: jax.Array  # [] int32 optimizer updates applied or skipped
    params: Any
    opt_state: Any
    skipped: jax.Array  # [] int32 updates skipped for non-finite loss or gradients


def make_optimizer(tcfg: TrainSection, total_steps: int, learning_rate: float):
    """RMSProp as torch/HF use it (alpha 0.99, eps outside the sqrt) or AdamW; linear warmup then
    decay to 0 over `total_steps`, linear (the reference's HF linear schedule) or cosine (HF's
    cosine schedule, alignment-handbook's SFT)."""
    warmup = int(round(tcfg.warmup_ratio * total_steps))
    decay = max(total_steps - warmup, 1)
    after = (optax.cosine_decay_schedule(learning_rate, decay) if tcfg.lr_schedule == "cosine"
             else optax.linear_schedule(learning_rate, 0.0, decay))
    schedule = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, max(warmup, 1)), after], [warmup])
    if tcfg.optimizer == "rmsprop":
        opt = optax.chain(optax.scale_by_rms(decay=0.99, eps=1e-8, eps_in_sqrt=False),
                          optax.add_decayed_weights(tcfg.weight_decay) if tcfg.weight_decay else optax.identity(),
                          optax.scale_by_learning_rate(schedule))
    elif tcfg.optimizer == "adamw":
        opt = optax.adamw(schedule, weight_decay=tcfg.weight_decay)
    else:
        raise ValueError(f"train.optimizer={tcfg.optimizer!r}; expected rmsprop or adamw")
    if tcfg.max_grad_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(tcfg.max_grad_norm), opt)
    return opt, schedule


def init_state(params, tx) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      skipped=jnp.zeros((), jnp.int32))


class SpinObjective:
    """What the SPIN step minimises: the mean pair loss (`loss.spin_loss`) of each micro-batch, over
    a `SpinBatch`, against the opponent's log-probs (in the step or precomputed). An objective gives
    train_step its per-micro-batch loss, the batch's shardings and the progress bar's metrics; SFT's
    is `spin_jax.sft.SftObjective`."""

    postfix = (("loss", "loss", ".4f"), ("rewards/margins", "margin", ".3f"), ("rewards/accuracies", "acc", ".2f"))

    def __init__(self, cfg: ModelConfig, tcfg: TrainSection):
        self.cfg, self.tcfg = cfg, tcfg
        self.uses_opponent = tcfg.opponent_logps == "in_step"

    def normaliser(self, batch: SpinBatch):
        """Every micro-batch's mean counts 1 / (micro-batches) of the update's loss."""
        return batch.tokens.shape[0]

    def micro_loss(self, params, opponent_params, micro: SpinBatch, n_micro):
        losses, metrics = pair_losses(params, opponent_params, self.cfg, self.tcfg, micro)
        return losses.mean() / n_micro, jax.tree.map(jnp.mean, metrics)

    def shardings(self, mesh) -> SpinBatch:
        return batch_shardings(mesh, with_logps=not self.uses_opponent)

    def host_batch(self, batch: SpinBatch) -> SpinBatch:
        """The batch as the step takes it: with the opponent's log-probs only when precomputed."""
        if self.uses_opponent:
            return batch.with_opponent_logps(None)
        if batch.opponent_logps is None:
            raise ValueError("train.opponent_logps=precomputed needs the opponent's log-probs in every batch "
                             "(the store's opponent_logp_real/generated); regenerate the iteration's data or "
                             "set train.opponent_logps=in_step")
        return batch


def pair_losses(params, opponent_params, cfg: ModelConfig, tcfg: TrainSection, micro: SpinBatch):
    """Per-pair losses [B] and metrics for one micro-batch (B prompts, 2B responses): one forward."""
    logps = scoring.batch_logps(params, cfg, micro, tcfg.vocab_chunk)
    if tcfg.opponent_logps == "in_step":
        opp = jax.lax.stop_gradient(scoring.batch_logps(opponent_params, cfg, micro, tcfg.vocab_chunk))
    else:
        opp = micro.opponent_logps
    return loss_lib.spin_loss(logps[0::2], logps[1::2], opp[0::2], opp[1::2], tcfg.beta, tcfg.loss_type)


def train_step(state: TrainState, opponent_params, batch, base=None, *, cfg: ModelConfig,
               tcfg: TrainSection, tx, objective=None):
    """One optimizer update from A accumulated micro-batches of `objective`'s loss (default SPIN's).
    Pure: returns (new state, metrics). With LoRA, `base` is the frozen base (an input, never
    updated) and state.params the adapters: the policy is base + adapters, and the in-step opponent
    is the base alone (opponent_params is then None: the base is not passed twice)."""
    objective = objective or SpinObjective(cfg, tcfg)
    n_micro = batch.tokens.shape[0]
    norm = objective.normaliser(batch)
    if base is not None:
        opponent_params = base
    dropout = base is not None and cfg.lora_dropout > 0

    def micro_loss(params, micro, key):
        if base is not None:
            params = lora.attach(base, params, key if dropout else None)
        return objective.micro_loss(params, opponent_params, micro, norm)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    step_key = jax.random.fold_in(jax.random.key(LORA_DROPOUT_SEED), state.step)

    def accumulate(carry, xs):
        grads, loss = carry
        micro, i = xs
        (l, metrics), g = grad_fn(state.params, micro, jax.random.fold_in(step_key, i))
        return (jax.tree.map(jnp.add, grads, g), loss + l), metrics

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    (grads, loss), metrics = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)),
                                         (batch, jnp.arange(n_micro, dtype=jnp.int32)))
    metrics = jax.tree.map(jnp.mean, metrics)
    finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                           opt_state=keep(new_opt, state.opt_state),
                           skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                   skipped=new_state.skipped.astype(jnp.float32))
    return new_state, metrics


def make_train_step(cfg: ModelConfig, tcfg: TrainSection, tx, mesh, state_shapes: TrainState, base_shapes=None,
                    objective=None):
    """jit(train_step) with explicit shardings (params by the rule table, batch over data/fsdp)
    and the state donated: step(state, opponent_params, batch[, base]) -> (state, metrics). In
    precomputed mode opponent_params is None and the batch carries opponent_logps. With LoRA
    (`base_shapes`: the frozen base's shapes), the state holds the adapters and the base is an
    argument; the in-step opponent is that base, and opponent_params is None. `objective`: SPIN's
    (default) or SFT's (`spin_jax.sft`, no opponent: opponent_params is None)."""
    objective = objective or SpinObjective(cfg, tcfg)
    state_sh = state_shardings(cfg, mesh, state_shapes, tx)
    opponent_sh = state_sh.params if objective.uses_opponent and base_shapes is None else None
    base_sh = () if base_shapes is None else (transformer.param_shardings(cfg, mesh, base_shapes),)
    fn = sharding.traced_on(mesh, functools.partial(train_step, cfg=cfg, tcfg=tcfg, tx=tx, objective=objective))
    return jax.jit(fn, in_shardings=(state_sh, opponent_sh, objective.shardings(mesh)) + base_sh,
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,),
                   compiler_options=compiler_options(mesh))


# the seed of LoRA dropout's masks (folded with the update's step and the micro-batch)
LORA_DROPOUT_SEED = 20240102


# XLA:CPU hands dots and reductions to YNNPACK by default; this keeps YNNPACK for dots only (the
# same program as XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce), because XLA's own loops
# do the vocab log-sum-exp's reductions faster (bench/RESULTS.md, "Attention and log-softmax kernels").
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def compiler_options(mesh):
    """XLA options for the train step: CPU_COMPILER_OPTIONS on CPU devices, none elsewhere."""
    return dict(CPU_COMPILER_OPTIONS) if mesh.devices.flat[0].platform == "cpu" else None


def state_shardings(cfg: ModelConfig, mesh, state_shapes: TrainState, tx) -> TrainState:
    """Params by the rule table; optimizer moments like the params they track (optax maps the
    param shardings onto every param-shaped tree of the optimizer state); the rest replicated."""
    rep = sharding.replicated(mesh)
    param_sh = trainable_shardings(cfg, mesh, state_shapes.params)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, state_shapes.opt_state, param_sh,
                                   transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=param_sh, opt_state=opt_sh, skipped=rep)


def trainable_shardings(cfg: ModelConfig, mesh, shapes):
    """The trained tree's shardings: a whole params tree, or LoRA adapters (no `embed`)."""
    if "embed" in shapes:
        return transformer.param_shardings(cfg, mesh, shapes)
    return sharding.tree_shardings(transformer.adapter_axes(cfg, shapes), shapes, mesh)


def batch_shardings(mesh, with_logps: bool) -> SpinBatch:
    """A micro-batched SpinBatch's shardings: axis 0 (micro-batches) replicated, axis 1 over the
    mesh's data and fsdp axes."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    sh = sharding.NamedSharding(mesh, sharding.P(None, axes if len(axes) > 1 else (axes[0] if axes else None)))
    return SpinBatch(prompt_tokens=sh, prompt_valid=sh, prompt_positions=sh, tokens=sh, valid=sh, positions=sh,
                     opponent_logps=sh if with_logps else None)


def device_batch(batch, mesh, tcfg: TrainSection, objective=None):
    """A host-local batch -> tcfg.grad_accum micro-batches as global arrays sharded over (data,
    fsdp) on axis 1. SPIN's (the default objective) in precomputed mode must carry the opponent's
    log-probs."""
    objective = objective or SpinObjective(None, tcfg)
    batch = objective.host_batch(batch).microbatches(tcfg.grad_accum)
    shardings = objective.shardings(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, shardings)
    # Each host holds its own contiguous slice of whole pairs on axis 1.
    return jax.tree.map(jax.make_array_from_process_local_data, shardings, batch)


# ----------------------------------------------------------------------------------------------
# The trainer: resumable, checkpointed, preemption-safe.


class Trainer:
    """Owns one iteration's jitted step, its checkpoints (`Checkpoints`) and its metrics writer.

        trainer = Trainer(cfg, tcfg, mesh, steps, learning_rate, out_dir)
        final_params, summary = trainer.run(params, opponent_params, batches_from)

    batches_from(start_step) yields host-local SpinBatches (B prompts, 2B responses; see
    data.examples.make_batches) starting at that update. Checkpoints go to out_dir/checkpoints
    every tcfg.checkpoint_every updates and at the end; a rerun resumes from the newest valid one
    at the same data position, and metrics.jsonl is cut back to that step. SIGTERM (spot or
    preemptible VMs) saves a checkpoint and raises Preempted. More than tcfg.max_skipped_fraction
    of the updates skipped (non-finite loss or gradients) stops training with TooManySkipped.
    """

    def __init__(self, cfg: ModelConfig, tcfg: TrainSection, mesh, steps: int, learning_rate: float,
                 out_dir: str, progress: bool = True, on_metrics: Optional[Callable[[dict], None]] = None,
                 objective=None, desc: str = "train"):
        self.cfg, self.tcfg, self.mesh, self.steps, self.out_dir = cfg, tcfg, mesh, steps, out_dir
        self.progress, self.on_metrics, self.desc = progress, on_metrics, desc
        self.objective = objective or SpinObjective(cfg, tcfg)
        self.tx, self.schedule = make_optimizer(tcfg, steps, learning_rate)
        self.checkpoints = Checkpoints(os.path.join(out_dir, "checkpoints"), tcfg.keep_checkpoints)

    def run(self, params, opponent_params, batches_from: Callable[[int], Iterator[SpinBatch]],
            stop_after: Optional[int] = None, base=None):
        """Train for self.steps updates (or until `stop_after`); returns (final params as numpy,
        summary {"steps", "skipped_updates", "train_seconds"}). With LoRA, `params` are the
        adapters, `base` the frozen base, and an in-step opponent is that base."""
        shapes = jax.eval_shape(lambda p: init_state(p, self.tx), params)
        state_sh = state_shardings(self.cfg, self.mesh, shapes, self.tx)
        extra = ()
        if base is not None:
            base = transformer.shard_params(base, self.cfg, self.mesh)
            extra = (base,)
        # precomputed mode: the log-probs come with the batch, so no second model is in memory
        opponent = None
        if self.objective.uses_opponent and base is None:
            opponent = jax.device_put(opponent_params, state_sh.params)
        state, start = self.checkpoints.restore_latest(sharding.abstract(shapes, state_sh))
        if state is None:
            init = jax.jit(lambda p: init_state(p, self.tx), out_shardings=state_sh)
            state = init(jax.device_put(params, state_sh.params))
        else:
            log.info(f"resumed from checkpoint step {start} in {self.checkpoints.directory}")
        truncate_metrics(self.out_dir, start)  # updates after the checkpoint are redone
        max_skipped = int(self.tcfg.max_skipped_fraction * self.steps)
        step_fn = make_train_step(self.cfg, self.tcfg, self.tx, self.mesh, shapes,
                                  None if base is None else jax.eval_shape(lambda b: b, base), self.objective)
        with self.checkpoints, _SigtermFlag() as sigterm, MetricsWriter(self.out_dir, self.on_metrics) as writer, \
                self._bar(start) as bar:
            t0 = time.perf_counter()
            batches = batches_from(start)
            for step in range(start, self.steps):
                batch = device_batch(next(batches), self.mesh, self.tcfg, self.objective)
                state, metrics = step_fn(state, opponent, batch, *extra)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                metrics.update(step=step + 1, learning_rate=float(self.schedule(step)))
                if (step + 1) % self.tcfg.log_every == 0:
                    writer.write(metrics)
                skipped = int(metrics["skipped"])
                bar.update(1)
                bar.set_postfix({label: f"{metrics[key]:{fmt}}" for key, label, fmt in self.objective.postfix},
                                **({"skipped": skipped} if skipped else {}))
                if skipped > max_skipped:
                    raise TooManySkipped(
                        f"{skipped} of {step + 1} updates were skipped for a non-finite loss or gradients, more "
                        f"than train.max_skipped_fraction={self.tcfg.max_skipped_fraction} of {self.steps}; nothing "
                        f"was exported. Lower train.learning_rate or set train.max_grad_norm, then rerun (the "
                        f"checkpoints in {self.checkpoints.directory} are kept)")
                done = step + 1
                term = _any_process(sigterm.raised)  # hosts save and stop at the same step
                if done % self.tcfg.checkpoint_every == 0 or done == self.steps or term:
                    self.checkpoints.save(done, state)
                if term:
                    self.checkpoints.wait()
                    raise Preempted(done, self.checkpoints.directory)
                if stop_after is not None and done >= stop_after:
                    break
            self.checkpoints.wait()
        summary = {"steps": int(state.step), "skipped_updates": int(state.skipped),
                   "train_seconds": time.perf_counter() - t0}
        return _to_host(state.params), summary

    def _bar(self, start: int):
        from tqdm import tqdm

        return tqdm(total=self.steps, initial=start, desc=self.desc, unit="step",
                    disable=not self.progress or jax.process_index() != 0)


class Checkpoints:
    """TrainState checkpoints (orbax CheckpointManager), each saved with a checksum of its bytes.
    Restoring verifies orbax's own files and the checksum; a damaged checkpoint is moved aside to
    `<directory>_damaged/` (never deleted) and the previous one is tried."""

    def __init__(self, directory: str, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True))

    def save(self, step: int, state: TrainState) -> None:
        self.wait()  # the previous save is complete, so the free space below is what is left
        nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
        if jax.process_index() == 0:
            rundir.check_free_space(self.directory, nbytes, f"checkpoint {step}")
        checksum = np.asarray(state_checksum(state)).tolist()
        with _disk_errors(self.directory):
            self.manager.save(step, force=True, args=self.ocp.args.Composite(
                state=self.ocp.args.StandardSave(state),
                checksum=self.ocp.args.JsonSave({"version": 1, "state": checksum})))

    def wait(self) -> None:
        with _disk_errors(self.directory):
            self.manager.wait_until_finished()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        """Leaving with an error: let a save in flight finish (its own error is not the one to show)."""
        if exc_type is not None:
            with contextlib.suppress(Exception):
                self.manager.wait_until_finished()

    def restore_latest(self, abstract: TrainState):
        """(state, step) of the newest checkpoint that reads back whole and matches its checksum, or
        (None, 0) if there is none."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(step, args=self.ocp.args.Composite(
                    state=self.ocp.args.StandardRestore(abstract), checksum=self.ocp.args.JsonRestore()))
                if np.asarray(state_checksum(restored["state"])).tolist() != restored["checksum"]["state"]:
                    raise ValueError("its contents do not match the checksum saved with it")
                return restored["state"], step
            except Exception as e:  # any way a checkpoint fails to read back is damage
                why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            moved = self._set_aside(step)
            log.warning(f"checkpoint {self.directory}/{step} is damaged ({why}); moved it to {moved} and "
                        "trying the previous one")
        return None, 0

    def _set_aside(self, step: int) -> str:
        aside = os.path.join(self.directory + "_damaged", f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
        sharding.barrier(f"checked checkpoint {step}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            os.rename(os.path.join(self.directory, str(step)), aside)
        sharding.barrier(f"moved checkpoint {step}")
        self.manager.reload()
        return aside


@contextlib.contextmanager
def _disk_errors(directory: str):
    """orbax reports a full disk as a ValueError from its writer threads: make it the OSError it is."""
    try:
        yield
    except ValueError as e:
        if "No space left on device" in str(e) or "os_error_code='28'" in str(e):
            raise OSError(errno.ENOSPC, "No space left on device", directory) from None
        raise


@jax.jit
def state_checksum(tree):
    """Two uint32 checksums per leaf of the bit patterns (their sum and an index-weighted sum):
    exact integer arithmetic, so the same on any mesh and in any reduction order. [leaves, 2]"""
    def words(x):
        if x.dtype == jnp.bool_:
            return x.astype(jnp.uint32).reshape(-1)
        bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32).reshape(-1)

    out = []
    for x in jax.tree.leaves(tree):
        w = words(jnp.asarray(x))
        i = jnp.arange(w.shape[0], dtype=jnp.uint32)
        out.append(jnp.stack([jnp.sum(w, dtype=jnp.uint32),
                              jnp.sum(w * (i * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32)]))
    return jnp.stack(out)


def truncate_metrics(out_dir: str, step: int) -> None:
    """Keep metrics.jsonl's lines of updates <= step (one per update): a resumed run logs the
    updates after its checkpoint again."""
    path = os.path.join(out_dir, rundir.METRICS)
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    rows = [r for r in rundir.read_metrics(path) if r["step"] <= step]
    rundir.atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


class _SigtermFlag:
    """Within the block, SIGTERM sets `raised` instead of killing the process."""

    def __enter__(self):
        self.raised = False
        self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, *_):
        self.raised = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._old)


def _any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (a SIGTERM may reach hosts at different steps)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _to_host(tree):
    """Global arrays -> numpy on every host (sharded params span hosts on a multi-host mesh)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


class MetricsWriter:
    """metrics.jsonl and TensorBoard event files in a run's iteration directory, and each row to
    `also` (W&B: spin_jax.tracking); process 0 only, the others write nothing."""

    def __init__(self, out_dir: str, also: Optional[Callable[[dict], None]] = None):
        self.out_dir, self.also = out_dir, also

    def __enter__(self):
        self._on = jax.process_index() == 0
        if self._on:
            from tensorboardX import SummaryWriter

            os.makedirs(self.out_dir, exist_ok=True)
            self._f = open(os.path.join(self.out_dir, rundir.METRICS), "a")
            self._tb = SummaryWriter(os.path.join(self.out_dir, "tensorboard"))
        return self

    def write(self, metrics: dict) -> None:
        if not self._on:
            return
        self._f.write(json.dumps(metrics) + "\n")
        self._f.flush()
        for k, v in metrics.items():
            if k != "step":
                self._tb.add_scalar(f"train/{k}", v, metrics["step"])
        if self.also:
            self.also(metrics)

    def __exit__(self, *exc):
        if self._on:
            self._f.close()
            self._tb.close()
