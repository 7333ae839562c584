"""SPIN loss vs a float64 numpy transcription; the train step vs a plain jax.grad; sharded == 1 device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spin_jax import loss as loss_lib
from spin_jax import sharding, train
from spin_jax.config import TrainSection
from spin_jax.data import tokenize
from spin_jax.model import transformer
from spin_jax.model.config import tiny_config


def numpy_reference(pr, pg, orr, og, beta, loss_type):
    """The reference trainer's formulas, float64."""
    pr, pg, orr, og = (np.asarray(x, np.float64) for x in (pr, pg, orr, og))
    logits = (pr - pg) - (orr - og)
    if loss_type == "sigmoid":
        losses = np.log1p(np.exp(-beta * logits))
    elif loss_type == "hinge":
        losses = np.maximum(0.0, 1.0 - beta * logits)
    else:  # IPO (Azar et al. 2023, eq. 17): (h - 1/(2 tau))^2
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    rr, rg = beta * (pr - orr), beta * (pg - og)
    return losses, {"rewards/real": rr, "rewards/generated": rg, "rewards/margins": rr - rg,
                    "rewards/accuracies": (rr > rg).astype(np.float64), "logps/real": pr,
                    "logps/generated": pg}


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_spin_loss_matches_float64_numpy(loss_type):
    rng = np.random.default_rng(0)
    x = [rng.normal(-50, 20, size=64).astype(np.float32) for _ in range(4)]
    losses, metrics = loss_lib.spin_loss(*x, beta=0.1, loss_type=loss_type)
    ref_l, ref_m = numpy_reference(*x, 0.1, loss_type)
    np.testing.assert_allclose(losses, ref_l, rtol=1e-5, atol=1e-6)
    for k, v in ref_m.items():
        np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-5, err_msg=k)


def test_chunked_token_logps_equal_full_softmax():
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(2, 5, 8)).astype(np.float32)
    w = rng.normal(size=(8, 37)).astype(np.float32)
    labels = rng.integers(0, 37, size=(2, 5))
    logits = hidden.astype(np.float64) @ w.astype(np.float64)
    ref = np.take_along_axis(logits, labels[..., None], -1)[..., 0] - np.log(np.exp(logits).sum(-1))
    for chunk in (0, 5, 16, 37):
        np.testing.assert_allclose(loss_lib.token_logps_chunked(hidden, w, labels, chunk), ref, rtol=1e-5)


def test_token_logps_gradient_equals_float64_formula():
    """The whole-vocab log-probs have a hand-written backward: check it against the analytic
    gradient of sum_t g_t * log softmax(h_t W)[label_t] in float64 numpy."""
    rng = np.random.default_rng(2)
    hidden = rng.normal(size=(2, 5, 8)).astype(np.float32)
    w = rng.normal(size=(8, 37)).astype(np.float32)
    labels = rng.integers(0, 37, size=(2, 5))
    g = rng.normal(size=(2, 5)).astype(np.float32)
    d_h, d_w = jax.grad(lambda h, w: jnp.sum(g * loss_lib.token_logps_chunked(h, w, labels, 0)), argnums=(0, 1))(
        hidden, w)
    h64, w64 = hidden.astype(np.float64), w.astype(np.float64)
    logits = h64 @ w64
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    d_logits = g[..., None] * (np.eye(37)[labels] - p)
    np.testing.assert_allclose(d_h, d_logits @ w64.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_w, np.einsum("btd,btv->dv", h64, d_logits), rtol=1e-5, atol=1e-5)


def make_pairs(cfg, n_pairs, seed):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(3, cfg.vocab_size, size=rng.integers(2, 7))) for _ in range(n_pairs)]
    responses = [list(rng.integers(3, cfg.vocab_size, size=rng.integers(1, 6))) + [2] for _ in range(2 * n_pairs)]
    return prompts, responses  # responses 2i (real) and 2i + 1 (generated) continue prompt i


def make_batch(cfg, n_pairs=4, grad_accum=1, seed=0):
    """The training layout: each prompt once, its real and generated responses interleaved."""
    prompts, responses = make_pairs(cfg, n_pairs, seed)
    b = tokenize.pack_grouped(prompts, responses, 8, 8, opponent_logps=np.zeros((2 * n_pairs,), np.float32))
    return b.microbatches(grad_accum)


def full_rows(cfg, n_pairs=4, seed=0):
    """The same pairs as whole rows [prompt + response] (the reference's concatenated layout)."""
    prompts, responses = make_pairs(cfg, n_pairs, seed)
    return tokenize.pack([p for p in prompts for _ in (0, 1)], responses, 8, 8)


def plain_loss(params, opponent, cfg, micro, beta):
    """An unsharded, unchunked reimplementation: full logits, log_softmax, explicit sigmoid loss."""
    def seq_logps(p):
        logits, _ = transformer.forward(p, cfg, micro["tokens"], micro["positions"], micro["valid"])
        lp = jax.nn.log_softmax(logits, -1)
        tok = jnp.take_along_axis(lp, micro["labels"][..., None], -1)[..., 0]
        return (tok * micro["loss_mask"]).sum(-1)
    pi, op = seq_logps(params), seq_logps(opponent)
    z = (pi[0::2] - pi[1::2]) - (op[0::2] - op[1::2])
    return jnp.mean(jnp.log1p(jnp.exp(-beta * z)))


def moved(cfg):
    """(cfg, policy, opponent): random opponent params and a policy a little away from them, so the
    SPIN gradient is neither the trivial one nor a near-cancelling difference of the two models'."""
    opponent = transformer.init_params(cfg, jax.random.key(0))
    keys = dict(zip(opponent, jax.random.split(jax.random.key(1), len(opponent))))
    keys["layers"] = {n: jax.random.fold_in(jax.random.key(2), i) for i, n in enumerate(opponent["layers"])}
    policy = jax.tree.map(lambda p, k: p + 0.01 * jax.random.normal(k, p.shape), opponent, keys)
    return cfg, policy, opponent


@pytest.fixture(scope="module")
def tiny():
    return moved(tiny_config("llama"))


@pytest.mark.parametrize("remat,attn_block", [("none", 0), ("dots", 3), ("full", 3)])
def test_train_step_gradient_matches_plain_jax_grad(tiny, remat, attn_block):
    """Each remat policy (dots saves the projections and attention's output and log-sum-exp) and
    query-blocked attention give the plain reference's gradient (no remat, one attention block)."""
    cfg, policy, opponent = tiny
    step_cfg = cfg.replace(remat=remat, attn_block=attn_block)
    tcfg = TrainSection(beta=0.1, opponent_logps="in_step", vocab_chunk=48)
    batch = make_batch(cfg, n_pairs=4, grad_accum=2)
    tx = optax.sgd(1.0)  # new = old - grad: the update exposes the gradient
    state = train.init_state(policy, tx)
    new_state, metrics = jax.jit(lambda s, o, b: train.train_step(s, o, b, cfg=step_cfg, tcfg=tcfg, tx=tx))(
        state, opponent, batch)
    # the reference runs whole concatenated rows: it checks the shared-prompt forward too
    ref_loss, ref_grads = jax.value_and_grad(plain_loss)(policy, opponent, cfg.replace(attn_block=0),
                                                         full_rows(cfg, 4), 0.1)
    got_grads = jax.tree.map(lambda a, b: a - b, policy, new_state.params)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
        assert np.abs(np.asarray(g) - np.asarray(r)).max() <= 1e-4 * np.abs(np.asarray(r)).max() + 1e-9


def test_precomputed_opponent_logps_give_the_same_loss(tiny):
    cfg, policy, opponent = tiny
    batch = make_batch(cfg, n_pairs=4)
    tx = optax.sgd(1e-3)
    flat = jax.tree.map(lambda v: v[0], batch)
    batch = batch.with_opponent_logps(np.asarray(
        jax.jit(lambda p, b: train.scoring.batch_logps(p, cfg, b))(opponent, flat))[None])
    out = {}
    for mode in ("in_step", "precomputed"):
        tcfg = TrainSection(opponent_logps=mode)
        state = train.init_state(policy, tx)
        opp = opponent if mode == "in_step" else None
        new, m = train.train_step(state, opp, batch, cfg=cfg, tcfg=tcfg, tx=tx)
        out[mode] = (m, new.params)
    np.testing.assert_allclose(out["in_step"][0]["loss"], out["precomputed"][0]["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out["in_step"][1]), jax.tree.leaves(out["precomputed"][1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_non_finite_update_is_skipped_and_counted(tiny):
    cfg, policy, opponent = tiny
    batch = make_batch(cfg, n_pairs=2)
    batch = batch.with_opponent_logps(np.full_like(batch.opponent_logps, np.nan))
    tx = optax.sgd(1.0)
    state = train.init_state(policy, tx)
    new, m = train.train_step(state, None, batch, cfg=cfg, tcfg=TrainSection(), tx=tx)
    assert int(new.skipped) == 1 and int(new.step) == 1
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(policy)):
        np.testing.assert_array_equal(a, b)


def test_sharded_step_equals_single_device_and_opponent_is_untouched(tiny):
    cfg, policy, opponent = tiny
    cfg = dataclasses.replace(cfg)
    tcfg = TrainSection(opponent_logps="in_step", optimizer="rmsprop")
    prompts, responses = make_pairs(cfg, 8, 0)
    host_batch = tokenize.pack_grouped(prompts, responses, 8, 8)
    results = {}
    for name, mesh in (("one", sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])),
                       ("d2f2t2", sharding.make_mesh(2, 2, 2))):
        tx, _ = train.make_optimizer(tcfg, 10, 1e-5)  # 20x the paper's 5e-7
        shapes = jax.eval_shape(lambda p: train.init_state(p, tx), policy)
        step = train.make_train_step(cfg, tcfg, tx, mesh, shapes)
        sh = train.state_shardings(cfg, mesh, shapes, tx)
        state = jax.device_put(train.init_state(jax.tree.map(np.array, policy), tx), sh)
        opp = jax.device_put(opponent, sh.params)
        before = jax.tree.map(np.array, opp)
        for _ in range(2):
            state, m = step(state, opp, train.device_batch(host_batch, mesh, dataclasses.replace(tcfg, grad_accum=2)))
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(opp)))
        results[name] = (float(m["loss"]), jax.tree.map(np.asarray, state.params))
    assert abs(results["one"][0] - results["d2f2t2"][0]) <= 1e-5 * abs(results["one"][0])
    changed = False
    for a, b, p0 in zip(jax.tree.leaves(results["one"][1]), jax.tree.leaves(results["d2f2t2"][1]),
                        jax.tree.leaves(policy)):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
        changed |= not np.array_equal(a, np.asarray(p0))
    assert changed  # the policy moved
