"""Attention on the XLA path: masks, blocked causal attention, and grouped-query attention with a
hand-written backward.

Layouts (B batch, T queries, S keys, H query heads, K kv heads, G = H/K, E head dim):
    q [B, T, H, E]    keys kt [B, K, E, S] (transposed, as the KV cache stores them)
    values v [B, K, S, E]    mask [B, T, S] bool

A TPU kernel path can sit beside this one: the forward calls `causal_attention` and `attention`
only, so a dispatch on the backend goes here. Measured costs are in bench/RESULTS.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name


def attention_mask(cfg, q_slot, q_pos, k_slot, k_pos, k_valid):
    """[B, T, S] bool: key slot valid, not after the query, within the sliding window."""
    mask = (k_slot[None, None, :] <= q_slot[None, :, None]) & k_valid[:, None, :]
    if cfg.sliding_window is not None:
        mask &= (q_pos[:, :, None] - k_pos[:, None, :]) < cfg.sliding_window
    return mask


def causal_attention(q, kt, v, mask, offset: int, block: int):
    """`attention` where query t sits at key slot offset + t and sees no later slot (the mask says
    so too). Queries go in blocks of `block`, each against the keys up to its last query's slot, so
    most of the masked upper triangle is not computed. Exact: it only drops keys that every query
    of the block masks. block <= 0: one block."""
    t = q.shape[1]
    if block <= 0 or block >= t:
        return attention(q, kt, v, mask)
    outs = []
    for a in range(0, t, block):
        b = min(a + block, t)
        s = offset + b
        outs.append(attention(q[:, a:b], kt[..., :s], v[:, :, :s], mask[:, a:b, :s]))
    return jnp.concatenate(outs, axis=1)


@jax.custom_vjp
def attention(q, kt, v, mask):
    """Grouped-query attention -> [B, T, H, E] (layouts in the module docstring).

    (batch, kv head) lead both matmuls; the G query heads of a kv head and the T queries are
    stacked as G*T rows against the group's keys. In decode (T = 1) q needs no transpose, and keys
    stored [E, S] make q·k a plain [G, E] x [E, S] product.

    A query with no valid key (left padding) outputs 0, whatever keys it is shown, so attending in
    query blocks (`causal_attention`) is exact there too; such rows feed no valid token.

    The backward is FlashAttention's, untiled: it keeps O and each row's log-sum-exp (remat "dots"
    saves them), recomputes P = exp(S - lse) with one matmul and one exp, and takes
    dS = P * (dP - rowsum(dO * O)). P is exactly 0 at masked keys of any row with a valid key, and
    rows with none have dO = 0 (their output is the constant 0). Tested against autodiff of plain
    softmax attention and against torch in float64.
    """
    return _attention_fwd(q, kt, v, mask)[0]


def _attention_core(q, kt, v, mask):
    """-> (out [B, K, G*T, E], log-sum-exp of each row's masked scores [B, K, G, T], scaled grouped
    q [B, K, G*T, E], any_key [B, 1, G*T, 1]: the row has a valid key)."""
    b, t, h, e = q.shape
    kh = kt.shape[1]
    any_key = jnp.broadcast_to(jnp.any(mask, axis=-1)[:, None, None, :], (b, 1, h // kh, t))
    any_key = any_key.reshape(b, 1, -1, 1)
    # 1/sqrt(E) scales q, not the [rows, S] scores (exact for E a power of 4, as 1/8 for E = 64)
    q = (_group(q, kh).astype(jnp.float32) / np.sqrt(e).astype(np.float32)).astype(kt.dtype)
    scores = _masked_scores(q, kt, mask)
    m = jnp.max(scores, axis=-1, keepdims=True)  # never differentiated: the backward is _attention_bwd
    p = jnp.exp(scores - m)
    s = jnp.sum(p, axis=-1, keepdims=True)
    probs = (p / s).astype(v.dtype).reshape(b, kh, (h // kh) * t, -1)
    out = jnp.einsum("bkqs,bkse->bkqe", probs, v) * any_key.astype(v.dtype)  # [B, K, G*T, E]
    return out, (m + jnp.log(s))[..., 0], q, any_key


def _masked_scores(qs, kt, mask):
    """Scaled grouped q [B, K, G*T, E] x keys [B, K, E, S] -> fp32 scores [B, K, G, T, S], masked."""
    b, kh = kt.shape[:2]
    t = mask.shape[1]
    scores = jnp.einsum("bkqe,bkes->bkqs", qs, kt, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kh, -1, t, scores.shape[-1])
    return jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)


def _group(x, kh):
    """[B, T, K*G, E] -> [B, K, G*T, E]: a kv head's G query heads and T positions as rows."""
    b, t, h, e = x.shape
    return x.reshape(b, t, kh, h // kh, e).transpose(0, 2, 3, 1, 4).reshape(b, kh, -1, e)


def _ungroup(x, t):
    """[B, K, G*T, E] -> [B, T, K*G, E]."""
    b, kh, gt, e = x.shape
    return x.reshape(b, kh, gt // t, t, e).transpose(0, 3, 1, 2, 4).reshape(b, t, -1, e)


def _attention_fwd(q, kt, v, mask):
    out, lse, qs, any_key = _attention_core(q, kt, v, mask)
    out, lse = checkpoint_name(out, "attn_out"), checkpoint_name(lse, "attn_lse")
    return _ungroup(out, q.shape[1]), (qs, kt, v, mask, out, lse, any_key)


def _attention_bwd(res, d_out):
    qs, kt, v, mask, out, lse, any_key = res
    b, t, h, e = d_out.shape
    kh = kt.shape[1]
    # P recomputed from the saved log-sum-exp: one matmul and one exp, no max/sum passes and no P.V
    probs = jnp.exp(_masked_scores(qs, kt, mask) - lse[..., None]).reshape(b, kh, -1, kt.shape[-1])
    do = _group(d_out, kh) * any_key.astype(d_out.dtype)  # rows with no valid key output a constant
    dv = jnp.einsum("bkqs,bkqe->bkse", probs.astype(v.dtype), do, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bkqe,bkse->bkqs", do, v, preferred_element_type=jnp.float32)
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    ds = (probs * (dp - delta)).astype(qs.dtype)  # d scores
    dq = jnp.einsum("bkqs,bkes->bkqe", ds, kt, preferred_element_type=jnp.float32) / np.sqrt(e).astype(np.float32)
    dkt = jnp.einsum("bkqe,bkqs->bkes", qs, ds, preferred_element_type=jnp.float32)
    return (_ungroup(dq, t).astype(d_out.dtype), dkt.astype(kt.dtype), dv.astype(v.dtype), None)


attention.defvjp(_attention_fwd, _attention_bwd)
