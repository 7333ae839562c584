"""The sampler's KV cache: one fixed-size buffer of slots shared by the batch.

Keys are stored transposed, [E, S] per (layer, row, kv head), so a decode step's q·k is a plain
[G, E] x [E, S] matmul (see `attention.attention`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
    """Decode cache. Slots are absolute indices into a fixed-size buffer shared by the batch."""
    k: jax.Array  # [L, B, K, E, S] keys stored transposed
    v: jax.Array  # [L, B, K, S, E]
    pos: jax.Array  # [B, S] int32 position id of the token in each slot
    valid: jax.Array  # [B, S] bool: slot holds a real (non-padding) token
    index: jax.Array  # [] int32: next slot to write


CACHE_AXES = KVCache(k=("layers", "batch", "kv_heads", "head_dim", "cache_seq"),
                     v=("layers", "batch", "kv_heads", "cache_seq", "head_dim"),
                     pos=("batch", "cache_seq"), valid=("batch", "cache_seq"), index=())


def init_cache(cfg, batch: int, length: int, dtype=None) -> KVCache:
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
    k_shape = shape[:3] + (cfg.head_dim, length)
    return KVCache(k=jnp.zeros(k_shape, dtype), v=jnp.zeros(shape, dtype),
                   pos=jnp.zeros((batch, length), jnp.int32),
                   valid=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32))


def reset(cache: KVCache) -> KVCache:
    """The same buffers with empty bookkeeping: stale keys/values past the index are masked."""
    return KVCache(cache.k, cache.v, jnp.zeros_like(cache.pos), jnp.zeros_like(cache.valid),
                   jnp.zeros((), jnp.int32))


def slot_metadata(cache: KVCache, positions, valid):
    """Position ids and validity [B, S] of every slot once `positions`/`valid` [B, T] are written
    at slots [index, index + T)."""
    k_pos = jax.lax.dynamic_update_slice(cache.pos, positions.astype(jnp.int32), (0, cache.index))
    k_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache.index))
    return k_pos, k_valid


def write_decode(ck, cv, layer, kt, v, index):
    """Write one token's keys kt [B, K, E, 1] and values v [B, K, 1, E] of `layer` at slot `index`
    in place, then read the layer back. Returns (ck, cv, layer keys [B, K, E, S], values)."""
    ck = jax.lax.dynamic_update_slice(ck, kt[None], (layer, 0, 0, 0, index))
    cv = jax.lax.dynamic_update_slice(cv, v[None], (layer, 0, 0, index, 0))
    lk, lv = (jax.lax.dynamic_index_in_dim(c, layer, keepdims=False) for c in (ck, cv))
    return ck, cv, lk, lv


def write_prefill(ck, cv, layer, kt, v, index):
    """Write a prompt's keys kt [B, K, E, T] and values v [B, K, T, E] of `layer` at slots
    [index, index + T). The layer's slice is updated, then stored whole: reading it back from the
    updated cache would make XLA copy the whole value cache in every layer."""
    lk, lv = (jax.lax.dynamic_index_in_dim(c, layer, keepdims=False) for c in (ck, cv))
    lk = jax.lax.dynamic_update_slice(lk, kt, (0, 0, 0, index))
    lv = jax.lax.dynamic_update_slice(lv, v, (0, 0, index, 0))
    ck = jax.lax.dynamic_update_index_in_dim(ck, lk, layer, 0)
    cv = jax.lax.dynamic_update_index_in_dim(cv, lv, layer, 0)
    return ck, cv, lk, lv
