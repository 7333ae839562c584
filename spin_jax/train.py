"""SPIN training: the pure loss step with a frozen opponent, the optimizer, checkpoints, the loop.

    step = make_train_step(cfg, tcfg, tx, mesh, batch_shapes)
    state, metrics = step(state, opponent_params, batch)

A step's batch is in the grouped layout of data.tokenize.pack_grouped with a leading micro-batch
axis for gradient accumulation: prompts [A, b, P] and responses [A, 2b, R], where response row 2i
is prompt i's real response and row 2i + 1 the opponent's generated one. Each prompt is computed
once for both of its responses (llama.forward_shared_prefix) and logits are computed for response
positions only. A contiguous slice of b' prompts and their 2b' responses holds whole pairs, so each
host can hand in its own slice.
The opponent's log-probs come either from `opponent_params` inside the step (under
stop_gradient) or from `batch["opponent_logps"]` [A, 2b], computed once per iteration right after
sampling (then `opponent_params` is None and no second model is in memory); both give the same loss.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from spin_jax import loss as loss_lib
from spin_jax import scoring, sharding
from spin_jax.config import TrainSection
from spin_jax.data import tokenize
from spin_jax.model import llama
from spin_jax.model.config import ModelConfig

BATCH_KEYS = tokenize.PROMPT_KEYS + tokenize.RESPONSE_KEYS


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


def pair_losses(params, opponent_params, cfg: ModelConfig, tcfg: TrainSection, micro):
    """Per-pair losses [B] and metrics for one micro-batch (B prompts, 2B responses): one forward."""
    logps = scoring.batch_logps(params, cfg, micro, tcfg.vocab_chunk)
    if tcfg.opponent_logps == "in_step":
        opp = jax.lax.stop_gradient(scoring.batch_logps(opponent_params, cfg, micro, tcfg.vocab_chunk))
    else:
        opp = micro["opponent_logps"]
    return loss_lib.spin_loss(logps[0::2], logps[1::2], opp[0::2], opp[1::2], tcfg.beta, tcfg.loss_type)


def train_step(state: TrainState, opponent_params, batch, *, cfg: ModelConfig, tcfg: TrainSection, tx):
    """One optimizer update from A accumulated micro-batches. Pure: returns (new state, metrics)."""
    n_micro = batch["tokens"].shape[0]

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
    and the state donated."""
    param_sh = sharding.tree_shardings(llama.param_axes(cfg), state_shapes.params, mesh)
    state_sh = state_shardings(cfg, mesh, state_shapes)
    batch_sh = {k: sharding.NamedSharding(mesh, sharding.P(None, *_batch_spec(mesh)))
                for k in BATCH_KEYS + ("opponent_logps",)}
    fn = functools.partial(train_step, cfg=cfg, tcfg=tcfg, tx=tx)
    out_sh = (state_sh, sharding.replicated(mesh))
    options = compiler_options(mesh)
    if tcfg.opponent_logps == "in_step":
        return jax.jit(fn, in_shardings=(state_sh, param_sh, batch_sh), out_shardings=out_sh,
                       donate_argnums=(0,), compiler_options=options)
    def train_step_precomputed(state, batch):  # named: the compiled program is jit_train_step_precomputed
        return fn(state, None, batch)

    jitted = jax.jit(train_step_precomputed, in_shardings=(state_sh, batch_sh), out_shardings=out_sh,
                     donate_argnums=(0,), compiler_options=options)
    return lambda state, opponent_params, batch: jitted(state, batch)


# XLA:CPU hands dots and reductions to YNNPACK by default; this keeps YNNPACK for dots only (the
# same program as XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce), because XLA's own loops
# do the reductions faster here (the vocab log-sum-exp's exp-and-sum: 39 vs 65 ms at [512, 49152]);
# see bench/RESULTS.md.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def compiler_options(mesh):
    """XLA options for the train step: CPU_COMPILER_OPTIONS on CPU devices, none elsewhere."""
    return dict(CPU_COMPILER_OPTIONS) if mesh.devices.flat[0].platform == "cpu" else None


def state_shardings(cfg: ModelConfig, mesh, state_shapes: TrainState) -> TrainState:
    """Optimizer moments shard like the params they track (matched by shape and tree path)."""
    param_sh = sharding.tree_shardings(llama.param_axes(cfg), state_shapes.params, mesh)
    by_path = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(param_sh)}
    shape_by_path = {jax.tree_util.keystr(p): x.shape
                     for p, x in jax.tree_util.tree_leaves_with_path(state_shapes.params)}

    def opt_leaf(path, x):
        key = jax.tree_util.keystr(path)
        for pkey, sh in by_path.items():
            if key.endswith(pkey) and shape_by_path[pkey] == x.shape:
                return sh
        return sharding.replicated(mesh)

    opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, state_shapes.opt_state)
    rep = sharding.replicated(mesh)
    return TrainState(step=rep, params=param_sh, opt_state=opt_sh, skipped=rep)


def _batch_spec(mesh):
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    return (axes if len(axes) > 1 else (axes[0] if axes else None),)


def to_microbatches(batch: dict, grad_accum: int) -> dict:
    """A grouped batch (B prompts [B, ...], 2B response rows [2B, ...], pairs interleaved) ->
    grad_accum micro-batches [A, B/A, ...] and [A, 2B/A, ...], each holding whole pairs."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.shape[0] % grad_accum or (k in tokenize.RESPONSE_KEYS and v.shape[0] % (2 * grad_accum)):
            raise ValueError(f"batch {k!r} of {v.shape[0]} rows does not split into grad_accum={grad_accum} "
                             f"micro-batches of whole pairs")
        out[k] = v.reshape(grad_accum, v.shape[0] // grad_accum, *v.shape[1:])
    return out


# ----------------------------------------------------------------------------------------------
# The loop: resumable, checkpointed, preemption-safe.


def fit(params, opponent_params, cfg: ModelConfig, tcfg: TrainSection, mesh, batches_from, steps: int,
        learning_rate: float, out_dir: str, log=None, progress: bool = True, stop_after: Optional[int] = None):
    """Train for `steps` updates; returns (final params as numpy, summary dict).

    batches_from(start_step) yields host-local numpy batches in the grouped layout (B prompts, 2B
    responses, see data.examples.make_batches) starting at that update. Checkpoints go to out_dir/checkpoints every
    tcfg.checkpoint_every updates and at the end; a rerun resumes from the newest one at the same
    data position. SIGTERM (spot/preemptible VMs) saves a checkpoint and exits with status 0.
    """
    import signal
    import sys
    import time

    import orbax.checkpoint as ocp
    from tqdm import tqdm

    tx, schedule = make_optimizer(tcfg, steps, learning_rate)
    shapes = jax.eval_shape(lambda p: init_state(p, tx), params)
    state_sh = state_shardings(cfg, mesh, shapes)
    param_sh = state_sh.params
    params = jax.device_put(params, param_sh)
    if tcfg.opponent_logps == "in_step":
        opponent = jax.device_put(opponent_params, param_sh)
    else:  # log-probs come with the batch: no second model in memory
        opponent = None
    state = jax.jit(lambda p: init_state(p, tx), out_shardings=state_sh)(params)
    del params

    ckpt = ocp.CheckpointManager(
        os.path.abspath(os.path.join(out_dir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=tcfg.keep_checkpoints, enable_async_checkpointing=True))
    start = 0
    if ckpt.latest_step() is not None:
        start = ckpt.latest_step()
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_sh)
        state = ckpt.restore(start, args=ocp.args.StandardRestore(abstract))
        if log:
            log(f"resumed from checkpoint step {start} in {out_dir}/checkpoints")

    step_fn = make_train_step(cfg, tcfg, tx, mesh, shapes)
    stop = {"term": False}
    old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(term=True))
    writer = MetricsWriter(out_dir) if jax.process_index() == 0 else None
    history, t0 = [], time.perf_counter()
    bar = tqdm(total=steps, initial=start, desc="train", unit="step",
               disable=not progress or jax.process_index() != 0)
    try:
        it = batches_from(start)
        for step in range(start, steps):
            batch = to_microbatches(next(it), tcfg.grad_accum)
            batch = _global_batch(batch, mesh)
            state, metrics = step_fn(state, opponent, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            metrics.update(step=step + 1, learning_rate=float(schedule(step)))
            history.append(metrics)
            if writer and (step + 1) % tcfg.log_every == 0:
                writer.write(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", margin=f"{metrics['rewards/margins']:.3f}",
                            acc=f"{metrics['rewards/accuracies']:.2f}")
            done = step + 1
            term = _any_process(stop["term"])  # hosts save and stop at the same step
            if done % tcfg.checkpoint_every == 0 or done == steps or term:
                ckpt.save(done, args=ocp.args.StandardSave(state), force=True)
            if term:
                ckpt.wait_until_finished()
                if log:
                    log(f"SIGTERM: checkpoint {done} saved to {out_dir}/checkpoints; rerun the same command to resume")
                sys.exit(0)
            if stop_after is not None and done >= stop_after:
                break
        ckpt.wait_until_finished()
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, old_handler)
        if writer:
            writer.close()
    final = _to_host(state.params)
    summary = {"steps": int(state.step), "skipped_updates": int(state.skipped),
               "train_seconds": time.perf_counter() - t0, "history": history}
    return final, summary


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


def _global_batch(batch: dict, mesh):
    """Host-local numpy micro-batches -> global jax arrays sharded over (data, fsdp) on axis 1."""
    spec = sharding.P(None, *_batch_spec(mesh))
    sh = sharding.NamedSharding(mesh, spec)
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sh) for k, v in batch.items()}
    # Each host holds its own contiguous slice of whole pairs on axis 1.
    return {k: jax.make_array_from_process_local_data(sh, v) for k, v in batch.items()}


class MetricsWriter:
    """metrics.jsonl and TensorBoard event files in a run's iteration directory."""

    def __init__(self, out_dir: str):
        import json

        from tensorboardX import SummaryWriter

        os.makedirs(out_dir, exist_ok=True)
        self._json = json
        self._f = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def write(self, metrics: dict) -> None:
        self._f.write(self._json.dumps(metrics) + "\n")
        self._f.flush()
        for k, v in metrics.items():
            if k != "step":
                self._tb.add_scalar(f"train/{k}", v, metrics["step"])

    def close(self) -> None:
        self._f.close()
        self._tb.close()
