"""Attention on the XLA path: masks, blocked causal attention, and grouped-query attention with a
hand-written backward.

Layouts (B batch, T queries, S keys, H query heads, K kv heads, G = H/K, E head dim):
    q [B, T, H, E]    keys kt [B, K, E, S] (transposed, as the KV cache stores them)
    values v [B, K, S, E]    mask [B, T, S] bool

Training and scoring attention goes through `causal`, which picks this path or the Pallas TPU
kernel (`spin_jax.model.kernels`) by `model.attention`; decoding through the KV cache always runs
`attention` here. Measured costs are in bench/RESULTS.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from spin_jax import loss, sharding


def attention_mask(window, q_slot, q_pos, k_slot, k_pos, k_valid):
    """[B, T, S] bool: key slot valid, not after the query, within the sliding `window` (None: no
    window)."""
    mask = (k_slot[None, None, :] <= q_slot[None, :, None]) & k_valid[:, None, :]
    if window is not None:
        mask &= (q_pos[:, :, None] - k_pos[:, None, :]) < window
    return mask


def layer_masks(cfg, build):
    """(global mask, local mask) from build(window) -> mask: the two differ only when local and
    global layers mix (Gemma); `pick` chooses a layer's."""
    if cfg.mixed_layers:
        return build(None), build(cfg.sliding_window)
    mask = build(cfg.layer_windows()[0])
    return mask, mask


def pick(pair, local):
    """pair[1] on local layers, else pair[0] (`local` is the scanned per-layer flag)."""
    return pair[0] if pair[0] is pair[1] else jax.tree.map(lambda g, l: jnp.where(local, l, g), pair[0], pair[1])


def implementation(cfg) -> str:
    """"xla", "splash" or "splash-interpret": cfg.attention, with "auto" resolved for this
    process's backend (the kernel on TPU)."""
    if cfg.attention == "auto":
        return "splash" if jax.default_backend() == "tpu" else "xla"
    return cfg.attention


def causal(cfg, q, kt, v, masks, offset: int, q_valid, k_valid, local=False):
    """Causal attention of queries at key slots offset + t (layouts above) by
    `implementation(cfg)`: `masks` is `layer_masks`' pair, q_valid [B, T] / k_valid [B, S] the
    padding, `local` the layer's flag (a traced bool inside the layer scan). The two paths agree on
    every query with a valid key (`spin_jax.model.kernels`)."""
    impl = implementation(cfg)
    if impl == "xla":
        return causal_attention(q, kt, v, pick(masks, local), offset, cfg.attn_block, cfg.attn_softcap)
    from spin_jax.model import kernels  # Pallas loads only where the kernel runs

    def run(window):
        return lambda q, k, v: kernels.causal_attention(
            q, k, v, q_valid, k_valid, offset=offset, window=window, softcap=cfg.attn_softcap,
            interpret=impl == "splash-interpret", mesh=sharding.current_mesh())

    args = (q, kt.transpose(0, 3, 1, 2), v.transpose(0, 2, 1, 3))
    if not cfg.mixed_layers:
        return run(cfg.layer_windows()[0])(*args)
    return jax.lax.cond(local, run(cfg.sliding_window), run(None), *args)


def causal_attention(q, kt, v, mask, offset: int, block: int, softcap=None):
    """`attention` where query t sits at key slot offset + t and sees no later slot (the mask says
    so too). Queries go in blocks of `block`, each against the keys up to its last query's slot, so
    most of the masked upper triangle is not computed. Exact: it only drops keys that every query
    of the block masks. block <= 0: one block."""
    t = q.shape[1]
    if block <= 0 or block >= t:
        return attention(q, kt, v, mask, softcap)
    outs = []
    for a in range(0, t, block):
        b = min(a + block, t)
        s = offset + b
        outs.append(attention(q[:, a:b], kt[..., :s], v[:, :, :s], mask[:, a:b, :s], softcap))
    return jnp.concatenate(outs, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q, kt, v, mask, softcap=None):
    """Grouped-query attention -> [B, T, H, E] (layouts in the module docstring); `softcap` caps
    the scores at cap * tanh(scores / cap) (Gemma 2).

    (batch, kv head) lead both matmuls; the G query heads of a kv head and the T queries are
    stacked as G*T rows against the group's keys. In decode (T = 1) q needs no transpose, and keys
    stored [E, S] make q·k a plain [G, E] x [E, S] product.

    A query with no valid key (left padding) outputs 0, whatever keys it is shown, so attending in
    query blocks (`causal_attention`) is exact there too; such rows feed no valid token.

    The backward is FlashAttention's, untiled: it keeps O and each row's log-sum-exp (remat "dots"
    saves them), recomputes P = exp(S - lse) with one matmul and one exp, and takes
    dS = P * (dP - rowsum(dO * O)). P is exactly 0 at masked keys of any row with a valid key, and
    rows with none have dO = 0 (their output is the constant 0). With a soft cap, dS is also
    multiplied by the cap's derivative 1 - (capped / cap)^2. Tested against autodiff of plain
    softmax attention and against torch in float64.
    """
    return _attention_fwd(q, kt, v, mask, softcap)[0]


def _attention_core(q, kt, v, mask, softcap):
    """-> (out [B, K, G*T, E], log-sum-exp of each row's masked scores [B, K, G, T], scaled grouped
    q [B, K, G*T, E], any_key [B, 1, G*T, 1]: the row has a valid key)."""
    b, t, h, e = q.shape
    kh = kt.shape[1]
    any_key = jnp.broadcast_to(jnp.any(mask, axis=-1)[:, None, None, :], (b, 1, h // kh, t))
    any_key = any_key.reshape(b, 1, -1, 1)
    # 1/sqrt(E) scales q, not the [rows, S] scores (exact for E a power of 4, as 1/8 for E = 64)
    q = (_group(q, kh).astype(jnp.float32) / np.sqrt(e).astype(np.float32)).astype(kt.dtype)
    scores = _masked_scores(q, kt, mask, softcap)[0]
    m = jnp.max(scores, axis=-1, keepdims=True)  # never differentiated: the backward is _attention_bwd
    p = jnp.exp(scores - m)
    s = jnp.sum(p, axis=-1, keepdims=True)
    probs = (p / s).astype(v.dtype).reshape(b, kh, (h // kh) * t, -1)
    out = jnp.einsum("bkqs,bkse->bkqe", probs, v) * any_key.astype(v.dtype)  # [B, K, G*T, E]
    return out, (m + jnp.log(s))[..., 0], q, any_key


def _masked_scores(qs, kt, mask, softcap):
    """Scaled grouped q [B, K, G*T, E] x keys [B, K, E, S] -> (fp32 scores [B, K, G, T, S], soft-capped
    and masked; the cap's derivative, or None without a cap)."""
    b, kh = kt.shape[:2]
    t = mask.shape[1]
    scores = jnp.einsum("bkqe,bkes->bkqs", qs, kt, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kh, -1, t, scores.shape[-1])
    d_cap = None
    if softcap is not None:
        scores = loss.softcap(scores, softcap)
        d_cap = loss.softcap_grad(scores, softcap)
    return jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min), d_cap


def _group(x, kh):
    """[B, T, K*G, E] -> [B, K, G*T, E]: a kv head's G query heads and T positions as rows."""
    b, t, h, e = x.shape
    return x.reshape(b, t, kh, h // kh, e).transpose(0, 2, 3, 1, 4).reshape(b, kh, -1, e)


def _ungroup(x, t):
    """[B, K, G*T, E] -> [B, T, K*G, E]."""
    b, kh, gt, e = x.shape
    return x.reshape(b, kh, gt // t, t, e).transpose(0, 3, 1, 2, 4).reshape(b, t, -1, e)


def _attention_fwd(q, kt, v, mask, softcap):
    out, lse, qs, any_key = _attention_core(q, kt, v, mask, softcap)
    out, lse = checkpoint_name(out, "attn_out"), checkpoint_name(lse, "attn_lse")
    return _ungroup(out, q.shape[1]), (qs, kt, v, mask, out, lse, any_key)


def _attention_bwd(softcap, res, d_out):
    qs, kt, v, mask, out, lse, any_key = res
    b, t, h, e = d_out.shape
    kh = kt.shape[1]
    # P recomputed from the saved log-sum-exp: one matmul and one exp, no max/sum passes and no P.V
    scores, d_cap = _masked_scores(qs, kt, mask, softcap)
    probs = jnp.exp(scores - lse[..., None]).reshape(b, kh, -1, kt.shape[-1])
    do = _group(d_out, kh) * any_key.astype(d_out.dtype)  # rows with no valid key output a constant
    dv = jnp.einsum("bkqs,bkqe->bkse", probs.astype(v.dtype), do, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bkqe,bkse->bkqs", do, v, preferred_element_type=jnp.float32)
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    ds = probs * (dp - delta)  # d scores
    if d_cap is not None:
        ds = ds * d_cap.reshape(ds.shape)
    ds = ds.astype(qs.dtype)
    dq = jnp.einsum("bkqs,bkes->bkqe", ds, kt, preferred_element_type=jnp.float32) / np.sqrt(e).astype(np.float32)
    dkt = jnp.einsum("bkqe,bkqs->bkes", qs, ds, preferred_element_type=jnp.float32)
    return (_ungroup(dq, t).astype(d_out.dtype), dkt.astype(kt.dtype), dv.astype(v.dtype), None)


attention.defvjp(_attention_fwd, _attention_bwd)
