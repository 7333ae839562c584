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
from spin_jax.errors import Preempted
from spin_jax.model import transformer
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
    linear decay to 0 over `total_steps` (the reference's HF linear schedule)."""
    warmup = int(round(tcfg.warmup_ratio * total_steps))
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, max(warmup, 1)),
         optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup, 1))], [warmup])
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


def pair_losses(params, opponent_params, cfg: ModelConfig, tcfg: TrainSection, micro: SpinBatch):
    """Per-pair losses [B] and metrics for one micro-batch (B prompts, 2B responses): one forward."""
    logps = scoring.batch_logps(params, cfg, micro, tcfg.vocab_chunk)
    if tcfg.opponent_logps == "in_step":
        opp = jax.lax.stop_gradient(scoring.batch_logps(opponent_params, cfg, micro, tcfg.vocab_chunk))
    else:
        opp = micro.opponent_logps
    return loss_lib.spin_loss(logps[0::2], logps[1::2], opp[0::2], opp[1::2], tcfg.beta, tcfg.loss_type)


def train_step(state: TrainState, opponent_params, batch: SpinBatch, *, cfg: ModelConfig, tcfg: TrainSection,
               tx):
    """One optimizer update from A accumulated micro-batches. Pure: returns (new state, metrics)."""
    n_micro = batch.tokens.shape[0]

    def micro_loss(params, micro):
        losses, metrics = pair_losses(params, opponent_params, cfg, tcfg, micro)
        return losses.mean() / n_micro, jax.tree.map(jnp.mean, metrics)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(carry, micro):
        grads, loss = carry
        (l, metrics), g = grad_fn(state.params, micro)
        return (jax.tree.map(jnp.add, grads, g), loss + l), metrics

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    (grads, loss), metrics = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)), batch)
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


def make_train_step(cfg: ModelConfig, tcfg: TrainSection, tx, mesh, state_shapes: TrainState):
    """jit(train_step) with explicit shardings (params by the rule table, batch over data/fsdp)
    and the state donated: step(state, opponent_params, batch) -> (state, metrics). In precomputed
    mode opponent_params is None and the batch carries opponent_logps."""
    state_sh = state_shardings(cfg, mesh, state_shapes, tx)
    in_step = tcfg.opponent_logps == "in_step"
    opponent_sh = state_sh.params if in_step else None
    fn = functools.partial(train_step, cfg=cfg, tcfg=tcfg, tx=tx)
    return jax.jit(fn, in_shardings=(state_sh, opponent_sh, batch_shardings(mesh, with_logps=not in_step)),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,),
                   compiler_options=compiler_options(mesh))


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
    param_sh = transformer.param_shardings(cfg, mesh, state_shapes.params)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, state_shapes.opt_state, param_sh,
                                   transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=param_sh, opt_state=opt_sh, skipped=rep)


def batch_shardings(mesh, with_logps: bool) -> SpinBatch:
    """A micro-batched SpinBatch's shardings: axis 0 (micro-batches) replicated, axis 1 over the
    mesh's data and fsdp axes."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    sh = sharding.NamedSharding(mesh, sharding.P(None, axes if len(axes) > 1 else (axes[0] if axes else None)))
    return SpinBatch(prompt_tokens=sh, prompt_valid=sh, prompt_positions=sh, tokens=sh, valid=sh, positions=sh,
                     opponent_logps=sh if with_logps else None)


def device_batch(batch: SpinBatch, mesh, tcfg: TrainSection) -> SpinBatch:
    """A host-local batch -> tcfg.grad_accum micro-batches as global arrays sharded over (data,
    fsdp) on axis 1. In precomputed mode the batch must carry the opponent's log-probs."""
    in_step = tcfg.opponent_logps == "in_step"
    if in_step:
        batch = batch.with_opponent_logps(None)
    elif batch.opponent_logps is None:
        raise ValueError("train.opponent_logps=precomputed needs the opponent's log-probs in every batch "
                         "(the store's opponent_logp_real/generated); regenerate the iteration's data or "
                         "set train.opponent_logps=in_step")
    batch = batch.microbatches(tcfg.grad_accum)
    shardings = batch_shardings(mesh, with_logps=not in_step)
    if jax.process_count() == 1:
        return jax.device_put(batch, shardings)
    # Each host holds its own contiguous slice of whole pairs on axis 1.
    return jax.tree.map(jax.make_array_from_process_local_data, shardings, batch)


# ----------------------------------------------------------------------------------------------
# The trainer: resumable, checkpointed, preemption-safe.


class Trainer:
    """Owns one iteration's jitted step, its orbax CheckpointManager and its metrics writer.

        trainer = Trainer(cfg, tcfg, mesh, steps, learning_rate, out_dir)
        final_params, summary = trainer.run(params, opponent_params, batches_from)

    batches_from(start_step) yields host-local SpinBatches (B prompts, 2B responses; see
    data.examples.make_batches) starting at that update. Checkpoints go to out_dir/checkpoints
    every tcfg.checkpoint_every updates and at the end; a rerun resumes from the newest one at the
    same data position. SIGTERM (spot/preemptible VMs) saves a checkpoint and raises Preempted.
    """

    def __init__(self, cfg: ModelConfig, tcfg: TrainSection, mesh, steps: int, learning_rate: float,
                 out_dir: str, progress: bool = True):
        self.cfg, self.tcfg, self.mesh, self.steps, self.out_dir = cfg, tcfg, mesh, steps, out_dir
        self.progress = progress
        self.tx, self.schedule = make_optimizer(tcfg, steps, learning_rate)
        self.ckpt_dir = os.path.abspath(os.path.join(out_dir, "checkpoints"))

    def run(self, params, opponent_params, batches_from: Callable[[int], Iterator[SpinBatch]],
            stop_after: Optional[int] = None):
        """Train for self.steps updates (or until `stop_after`); returns (final params as numpy,
        summary {"steps", "skipped_updates", "train_seconds"})."""
        import orbax.checkpoint as ocp

        shapes = jax.eval_shape(lambda p: init_state(p, self.tx), params)
        state_sh = state_shardings(self.cfg, self.mesh, shapes, self.tx)
        in_step = self.tcfg.opponent_logps == "in_step"
        # precomputed mode: the log-probs come with the batch, so no second model is in memory
        opponent = jax.device_put(opponent_params, state_sh.params) if in_step else None
        init = jax.jit(lambda p: init_state(p, self.tx), out_shardings=state_sh)
        state = init(jax.device_put(params, state_sh.params))
        ckpt = ocp.CheckpointManager(self.ckpt_dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=self.tcfg.keep_checkpoints, enable_async_checkpointing=True))
        start = ckpt.latest_step() or 0
        if start:
            abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_sh)
            state = ckpt.restore(start, args=ocp.args.StandardRestore(abstract))
            log.info(f"resumed from checkpoint step {start} in {self.ckpt_dir}")
        step_fn = make_train_step(self.cfg, self.tcfg, self.tx, self.mesh, shapes)
        with _SigtermFlag() as sigterm, MetricsWriter(self.out_dir) as writer, self._bar(start) as bar:
            t0 = time.perf_counter()
            batches = batches_from(start)
            for step in range(start, self.steps):
                batch = device_batch(next(batches), self.mesh, self.tcfg)
                state, metrics = step_fn(state, opponent, batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                metrics.update(step=step + 1, learning_rate=float(self.schedule(step)))
                if (step + 1) % self.tcfg.log_every == 0:
                    writer.write(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", margin=f"{metrics['rewards/margins']:.3f}",
                                acc=f"{metrics['rewards/accuracies']:.2f}")
                done = step + 1
                term = _any_process(sigterm.raised)  # hosts save and stop at the same step
                if done % self.tcfg.checkpoint_every == 0 or done == self.steps or term:
                    ckpt.save(done, args=ocp.args.StandardSave(state), force=True)
                if term:
                    ckpt.wait_until_finished()
                    raise Preempted(done, self.ckpt_dir)
                if stop_after is not None and done >= stop_after:
                    break
            ckpt.wait_until_finished()
        summary = {"steps": int(state.step), "skipped_updates": int(state.skipped),
                   "train_seconds": time.perf_counter() - t0}
        return _to_host(state.params), summary

    def _bar(self, start: int):
        from tqdm import tqdm

        return tqdm(total=self.steps, initial=start, desc="train", unit="step",
                    disable=not self.progress or jax.process_index() != 0)


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
    """metrics.jsonl and TensorBoard event files in a run's iteration directory (process 0 only;
    the others write nothing)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

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

    def __exit__(self, *exc):
        if self._on:
            self._f.close()
            self._tb.close()
