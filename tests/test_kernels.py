"""The Pallas TPU attention kernel (splash attention) equals the XLA path, run in Pallas interpret
mode on CPU: forward and gradients, with causal masking, Mistral's sliding window, grouped-query
attention, left-padded prompts, right-padded responses and the shared-prefix layout; inside the
train step, against a plain reference, and sharded under shard_map on an 8-device mesh. The
Mosaic lowering for a TPU topology is compiled in tests/test_plan.py (it needs libtpu)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spin_jax import sharding, train
from spin_jax.config import TrainSection
from spin_jax.data import tokenize
from spin_jax.model import attention
from spin_jax.model.config import tiny_config
from tests.test_train import full_rows, make_batch, make_pairs, moved, plain_loss


def _layout(rng, shared: bool, h: int, k: int, e: int = 16):
    """Queries, keys, values and masks of one attention call as the model builds them: with
    `shared`, 4 responses (right-padded) of 2 left-padded prompts attend to their prompt's keys and
    their own (offset = prompt length); else 2 left-padded rows attend to themselves."""
    n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    p, t = 6, 9
    plen = np.array([6, 3])
    pvalid = np.arange(p)[None] >= (p - plen)[:, None]
    ppos = np.maximum(np.arange(p)[None] - (p - plen)[:, None], 0)
    if not shared:
        valid = np.concatenate([pvalid, np.ones((2, t), bool)], 1)
        pos = np.maximum(np.arange(p + t)[None] - (p - plen)[:, None], 0)
        slot = jnp.arange(p + t)
        return dict(q=n(2, p + t, h, e), k=n(2, p + t, k, e), v=n(2, p + t, k, e), q_valid=valid, k_valid=valid,
                    q_slot=slot, q_pos=pos, k_slot=slot, k_pos=pos, offset=0)
    rlen = np.array([9, 4, 1, 7])
    cvalid = np.arange(t)[None] < rlen[:, None]
    cpos = np.repeat(plen, 2)[:, None] + np.arange(t)[None]
    rep = lambda a: np.repeat(a, 2, axis=0)  # noqa: E731
    return dict(q=n(4, t, h, e), k=n(4, p + t, k, e), v=n(4, p + t, k, e), q_valid=cvalid,
                k_valid=np.concatenate([rep(pvalid), cvalid], 1), q_slot=p + jnp.arange(t), q_pos=cpos,
                k_slot=jnp.arange(p + t), k_pos=np.concatenate([rep(ppos), cpos], 1), offset=p)


@pytest.mark.parametrize("shared,heads,window", [(True, (4, 2), None), (True, (4, 1), 3), (False, (4, 4), 4),
                                                 (False, (4, 2), None)])
def test_kernel_equals_xla_forward_and_gradients(shared, heads, window):
    """Every query with a valid key: outputs, and gradients of a loss on them, for q, k and v."""
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        rng = np.random.default_rng(0)
        x = _layout(rng, shared, *heads)
        cfg = tiny_config("llama", num_heads=heads[0], num_kv_heads=heads[1], sliding_window=window)
        mask = attention.attention_mask(window, x["q_slot"], x["q_pos"], x["k_slot"], x["k_pos"], x["k_valid"])
        rows = jnp.asarray(x["q_valid"])[:, :, None, None]
        w = jnp.asarray(rng.standard_normal(x["q"].shape), jnp.float32)

        def run(impl, q, k, v):
            kt, vv = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
            return attention.causal(cfg.replace(attention=impl), q, kt, vv, (mask, mask), x["offset"],
                                    jnp.asarray(x["q_valid"]), jnp.asarray(x["k_valid"]))

        def loss(impl, q, k, v):
            return jnp.sum(run(impl, q, k, v) * w * rows)

        args = (x["q"], x["k"], x["v"])
        ref, got = (np.asarray(run(i, *args)) for i in ("xla", "splash-interpret"))
        fwd = np.abs(ref - got)[x["q_valid"]].max() / np.abs(ref[x["q_valid"]]).max()
        g_ref, g_got = (jax.grad(lambda *a, i=i: loss(i, *a), argnums=(0, 1, 2))(*args)
                        for i in ("xla", "splash-interpret"))
        grads = [float(np.abs(np.asarray(a - b)).max() / np.abs(np.asarray(a)).max()) for a, b in zip(g_ref, g_got)]
        print(f"shared={shared} heads={heads} window={window}: forward {fwd:.1e}, "
              f"dq {grads[0]:.1e}, dk {grads[1]:.1e}, dv {grads[2]:.1e} (worst relative to the largest)")
        assert fwd <= 1e-5 and max(grads) <= 1e-5
    finally:
        jax.config.update("jax_default_matmul_precision", None)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
def test_train_step_on_the_kernel_matches_plain_reference(arch):
    """The shared-prefix train step with the kernel gives the loss and gradient of plain softmax
    attention over whole concatenated rows: grouped-query attention (Llama), a sliding window of 4,
    shorter than the rows (Mistral), and local and global layers with score soft-capping (Gemma 2:
    the kernel runs under lax.cond on the scanned layer kind)."""
    cfg, policy, opponent = moved(tiny_config(arch))
    tcfg = TrainSection(beta=0.1, opponent_logps="in_step", vocab_chunk=48)
    tx = optax.sgd(1.0)
    step_cfg = cfg.replace(attention="splash-interpret", remat="dots")
    new, metrics = jax.jit(lambda s, o, b: train.train_step(s, o, b, cfg=step_cfg, tcfg=tcfg, tx=tx))(
        train.init_state(policy, tx), opponent, make_batch(cfg, n_pairs=4, grad_accum=2))
    ref_loss, ref_grads = jax.value_and_grad(plain_loss)(policy, opponent, cfg.replace(attn_block=0, attention="xla"),
                                                         full_rows(cfg, 4), 0.1)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(jax.tree.map(jnp.subtract, policy, new.params)), jax.tree.leaves(ref_grads)):
        assert np.abs(np.asarray(g) - np.asarray(r)).max() <= 1e-4 * np.abs(np.asarray(r)).max() + 1e-9


def test_kernel_under_shard_map_equals_xla_on_one_device():
    """On a (data 2, fsdp 2, tensor 2) mesh the kernel runs under shard_map (rows over data x fsdp,
    heads over tensor); two updates equal the XLA path's on one device."""
    cfg, policy, opponent = moved(tiny_config("mistral"))
    tcfg = TrainSection(opponent_logps="in_step", optimizer="rmsprop")
    prompts, responses = make_pairs(cfg, 8, 0)
    host_batch = tokenize.pack_grouped(prompts, responses, 8, 8)
    results = {}
    for name, impl, mesh in (("xla", "xla", sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])),
                             ("kernel", "splash-interpret", sharding.make_mesh(2, 2, 2))):
        mc = cfg.replace(attention=impl)
        tx, _ = train.make_optimizer(tcfg, 10, 1e-5)
        shapes = jax.eval_shape(lambda p: train.init_state(p, tx), policy)
        step = train.make_train_step(mc, tcfg, tx, mesh, shapes)
        sh = train.state_shardings(mc, mesh, shapes, tx)
        state = jax.device_put(train.init_state(jax.tree.map(np.array, policy), tx), sh)
        opp = jax.device_put(opponent, sh.params)
        for _ in range(2):
            state, m = step(state, opp, train.device_batch(host_batch, mesh, dataclasses.replace(tcfg, grad_accum=2)))
        results[name] = (float(m["loss"]), jax.tree.map(np.asarray, state.params))
        if impl != "xla":
            hlo = step.lower(state, opp, train.device_batch(host_batch, mesh, tcfg)).as_text()
            assert "shard_map" in hlo or "sdy.manual_computation" in hlo
    assert abs(results["xla"][0] - results["kernel"][0]) <= 1e-5 * abs(results["xla"][0])
    for a, b in zip(jax.tree.leaves(results["xla"][1]), jax.tree.leaves(results["kernel"][1])):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_packed_sft_loss_on_the_kernel_equals_unpacked_xla(arch):
    """SFT's packed rows on the kernel (segment ids 1, 2, ... and 0 padding, positions restarting
    per segment): the loss and gradient of the same conversations one per row on the XLA path, with
    a sliding window shorter than a conversation (Mistral) and Gemma 2's mixed layers."""
    from spin_jax import sft
    from spin_jax.model import transformer

    cfg = tiny_config(arch)
    params = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(1)))
    rng = np.random.default_rng(3)
    encoded = [(list(rng.integers(1, cfg.vocab_size, n)), list(rng.random(n) < 0.6)) for n in (11, 7, 16, 5, 9)]
    lengths = [len(ids) for ids, _ in encoded]

    def loss_and_grad(c, batch):
        o = sft.SftObjective(c, TrainSection())
        return jax.value_and_grad(lambda p: o.micro_loss(p, None, batch, o.normaliser(batch))[0])(params)

    packed = sft.make_rows(encoded, sft.row_plan(lengths, range(5), 24, True), 24)
    assert packed.segments.max() >= 2
    unpacked = sft.make_rows(encoded, sft.row_plan(lengths, range(5), 16, False), 16)
    ref_loss, ref_grad = loss_and_grad(cfg.replace(attention="xla", attn_block=0), unpacked)
    got_loss, got_grad = loss_and_grad(cfg.replace(attention="splash-interpret"), packed)
    assert abs(float(got_loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for g, r in zip(jax.tree.leaves(got_grad), jax.tree.leaves(ref_grad)):
        assert np.abs(np.asarray(g) - np.asarray(r)).max() <= 1e-4 * np.abs(np.asarray(r)).max() + 1e-9
