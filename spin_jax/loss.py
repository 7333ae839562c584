"""SPIN's loss as pure functions of log-probs. Nothing here knows about models.

token_logps_chunked:  per-token fp32 log-probs from hidden states and the output matrix (the
                      reference sums them over a response, it does not average)
spin_loss:            per-example SPIN losses and the reference's metrics, given policy and
                      opponent log-probs of the real (human) and generated (opponent-sampled)
                      responses.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from spin_jax.sharding import constrain

LOSS_TYPES = ("sigmoid", "hinge", "ipo")
LOGITS = ("batch", "length", "vocab")  # a [B, T, V] block of logits (sharding.RULES lays it out)


def softcap(x, cap):
    """cap * tanh(x / cap) (Gemma 2's logit soft-capping); x itself when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def softcap_grad(capped, cap):
    """The soft cap's derivative where it gave `capped`: 1 - (capped / cap)^2."""
    return 1.0 - jnp.square(capped / cap)


def token_logps_chunked(hidden, w_out, labels, vocab_chunk: int, unroll: bool = False, cap=None):
    """Per-token log-probs [B, T] from hidden [B, T, D] and the output matrix w_out [D, V],
    computing the logits `vocab_chunk` columns at a time, so [B, T, V] fp32 never exists at once.
    cap: soft-cap the logits first (`softcap`)."""
    v = w_out.shape[1]
    hidden = constrain(hidden, ("batch", "length", "act_embed"))
    if vocab_chunk <= 0 or vocab_chunk >= v:
        return _token_logps(hidden, w_out, labels, cap)
    return _chunked_logps(hidden, w_out, labels, vocab_chunk, unroll, cap, argmax=False)[0]


def token_logps_and_argmax(hidden, w_out, labels, vocab_chunk: int, unroll: bool = False, cap=None):
    """Per-token log-probs [B, T] and the most likely token [B, T] (the first of equal logits, as
    numpy's and torch's argmax pick), `vocab_chunk` vocab columns at a time (0: all at once). No
    gradient: for scoring, e.g. lm-eval's is_greedy."""
    v = w_out.shape[1]
    hidden = constrain(hidden, ("batch", "length", "act_embed"))
    return _chunked_logps(hidden, w_out, labels, v if vocab_chunk <= 0 or vocab_chunk >= v else vocab_chunk,
                          unroll, cap, argmax=True)


def _chunked_logps(hidden, w_out, labels, chunk: int, unroll: bool, cap, argmax: bool):
    """(log-probs [B, T], argmax [B, T] or None): an online log-sum-exp over the vocab in chunks of
    `chunk` columns, picking the labels' logits (and tracking the largest logit's index) as it goes."""
    b, t, _ = hidden.shape
    v = w_out.shape[1]
    n = -(-v // chunk)
    w = jnp.pad(w_out, ((0, 0), (0, n * chunk - v))).reshape(w_out.shape[0], n, chunk).transpose(1, 0, 2)

    def body(carry, xs):
        m, s, picked, best = carry
        w_c, start = xs
        logits = jnp.einsum("btd,dv->btv", hidden, w_c, preferred_element_type=jnp.float32)
        logits = softcap(constrain(logits, LOGITS), cap)  # rows over the batch axes, the chunk over tensor
        logits = jnp.where(start + jnp.arange(chunk) < v, logits, -jnp.inf)
        top = logits.max(-1)
        if argmax:  # ties keep the earlier index
            best = jnp.where(top > m, start + jnp.argmax(logits, -1).astype(jnp.int32), best)
        m_new = jnp.maximum(m, top)
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[..., None]).sum(-1)
        local = labels - start
        hit = (local >= 0) & (local < chunk)
        got = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk - 1)[..., None], -1)[..., 0]
        return (m_new, s, jnp.where(hit, got, picked), best), None

    init = (jnp.full((b, t), -jnp.inf, jnp.float32), jnp.zeros((b, t), jnp.float32),
            jnp.zeros((b, t), jnp.float32), jnp.zeros((b, t), jnp.int32) if argmax else None)
    (m, s, picked, best), _ = jax.lax.scan(body, init, (w, jnp.arange(n) * chunk), unroll=True if unroll else 1)
    return picked - (m + jnp.log(s)), best


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _token_logps(hidden, w_out, labels, cap=None):
    """Per-token log-probs over the whole vocab. Its backward keeps only the log-sum-exp [B, T] and
    recomputes the logits in one pass, d logits = g * (onehot(label) - softmax), instead of
    autodiff's stored [B, T, V] intermediates (bench/RESULTS.md has the timing); with a soft cap,
    times the cap's derivative 1 - (logits / cap)^2."""
    return _token_logps_fwd(hidden, w_out, labels, cap)[0]


def _token_logps_fwd(hidden, w_out, labels, cap):
    logits = jnp.einsum("btd,dv->btv", hidden, w_out, preferred_element_type=jnp.float32)
    logits = softcap(constrain(logits, LOGITS), cap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return picked - lse, (hidden, w_out, labels, lse)


def _token_logps_bwd(cap, res, g):
    hidden, w_out, labels, lse = res
    logits = jnp.einsum("btd,dv->btv", hidden, w_out, preferred_element_type=jnp.float32)
    logits = softcap(constrain(logits, LOGITS), cap)
    d = g[..., None] * (jax.nn.one_hot(labels, w_out.shape[1], dtype=jnp.float32) - jnp.exp(logits - lse[..., None]))
    if cap is not None:
        d = d * softcap_grad(logits, cap)
    d_hidden = jnp.einsum("btv,dv->btd", d.astype(w_out.dtype), w_out, preferred_element_type=jnp.float32)
    d_w = jnp.einsum("btd,btv->dv", hidden, d.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return d_hidden.astype(hidden.dtype), d_w.astype(w_out.dtype), None


_token_logps.defvjp(_token_logps_fwd, _token_logps_bwd)


def spin_loss(policy_real, policy_generated, opponent_real, opponent_generated, beta: float,
              loss_type: str = "sigmoid"):
    """Per-example SPIN losses [B] and the reference's metrics (each [B]; average them yourself).

    logits = (pi_real - pi_gen) - (opp_real - opp_gen)
      sigmoid: -log sigmoid(beta * logits)        (the paper's logistic loss)
      hinge:   relu(1 - beta * logits)             (the reference trainer's alternative)
      ipo:     (logits - 1 / (2 beta))^2           (IPO's squared loss)
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}; expected one of {LOSS_TYPES}")
    pi_logratio = policy_real - policy_generated
    ref_logratio = opponent_real - opponent_generated
    logits = pi_logratio - ref_logratio
    if loss_type == "sigmoid":
        losses = -jax.nn.log_sigmoid(beta * logits)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * logits)
    else:
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    real_rewards = beta * (policy_real - opponent_real)
    generated_rewards = beta * (policy_generated - opponent_generated)
    metrics = {
        "rewards/real": real_rewards,
        "rewards/generated": generated_rewards,
        "rewards/margins": real_rewards - generated_rewards,
        "rewards/accuracies": (real_rewards > generated_rewards).astype(jnp.float32),
        "logps/real": policy_real,
        "logps/generated": policy_generated,
    }
    return losses, metrics
