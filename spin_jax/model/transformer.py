"""The causal LM as pure functions over a params pytree (Llama, Mistral, Qwen2/3, Gemma 2/3).

`init_params(cfg, rng)` builds the parameters with an NNX module (each weight an `nnx.Param`
carrying its logical axes) and returns them as a plain pytree; `param_axes(cfg)` returns the same
tree of logical-axis tuples, so sharding is a rule table (`spin_jax.sharding`). The layers are
stacked along a leading `layers` axis and run under `lax.scan`, so compile time does not grow with
depth; where local (sliding-window) and global layers mix, each layer's kind is scanned with its
weights and picks its mask and RoPE table, so the layers still compile once. Three forwards share
the layer's pieces (`_qkv`, `_attn_out_mlp`):
    forward / forward_hidden   whole rows, causal; with a `cache.KVCache`, the sampler's prefill
                               and decode step
    forward_shared_prefix      several continuations of one prefix, the prefix computed once
                               (SPIN's real and generated responses of a prompt)

Layout of the params tree (D hidden, H heads, K kv heads, E head_dim, F mlp, V vocab, L layers):
  embed            [V, D]
  layers/attn_norm [L, D]      layers/wq [L, D, H, E]   layers/wk, wv [L, D, K, E]
  layers/bq [L, H, E], bk, bv [L, K, E] (Qwen2 only)    layers/wo [L, H, E, D]
  layers/q_norm, k_norm [L, E] (Qwen3, Gemma 3)         layers/post_attn_norm, post_mlp_norm [L, D] (Gemma)
  layers/mlp_norm  [L, D]      layers/w_gate, w_up [L, D, F]   layers/w_down [L, F, D]
  final_norm       [D]
  lm_head          [D, V]      (absent with tied embeddings)
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spin_jax import sharding
from spin_jax.loss import LOGITS, softcap
from spin_jax.model import cache as cache_lib
from spin_jax.model import quant
from spin_jax.model.attention import attention, attention_mask, causal, layer_masks, pick
from spin_jax.model.cache import KVCache
from spin_jax.model.config import ModelConfig
from spin_jax.sharding import constrain

# Logical axes of the activations, constrained where their layout is decided (sharding.constrain):
# rows over (data, fsdp), heads, kv heads and the MLP over tensor, the hidden axis whole.
HIDDEN = ("batch", "length", "act_embed")  # [B, T, D]: the embeddings, each layer's input and output
HEADS = ("batch", "length", "heads", "head_dim")  # [B, T, H, E]: queries, attention's output
KV_HEADS = ("batch", "length", "kv_heads", "head_dim")  # [B, T, K, E]: keys, values
MLP = ("batch", "length", "mlp")  # [B, T, F]: the MLP's hidden activations

# ----------------------------------------------------------------------------------------------
# Forwards


def forward(params, cfg: ModelConfig, tokens, positions=None, valid=None,
            cache: Optional[KVCache] = None, window: Optional[int] = None):
    """Logits for `tokens` [B, T] (and the updated cache when one is given).

    positions: [B, T] int32 RoPE positions (default 0..T-1); valid: [B, T] bool, False on padding.
    Without a cache, attention is causal within `tokens`. With a cache, the T tokens are written at
    slots [cache.index, cache.index + T) and attend to every valid earlier slot. A static `window`
    limits attention to slots [0, window), which the caller guarantees covers cache.index + T: the
    sampler grows it in phases so early decode steps do not read the empty end of the cache.
    Returns (logits [B, T, V] float32, new_cache or None).
    """
    hidden, cache = forward_hidden(params, cfg, tokens, positions, valid, cache, window)
    return logits_from_hidden(params, cfg, hidden), cache


def forward_hidden(params, cfg: ModelConfig, tokens, positions=None, valid=None,
                   cache: Optional[KVCache] = None, window: Optional[int] = None, segments=None):
    """The final-norm hidden states [B, T, D] (compute dtype) and the updated cache.

    segments: [B, T] int32 for packed rows (no cache): several sequences side by side, numbered
    from 1 (0 is padding), each attending only to its own earlier tokens (block-diagonal causal
    attention); `positions` then restart at 0 for every sequence and `valid` is segments > 0."""
    t = tokens.shape[1]
    if segments is not None:
        valid = segments > 0
    positions, valid = _defaults(tokens, positions, valid)
    if cache is None:
        slot = jnp.arange(t, dtype=jnp.int32)

        def mask(w):
            m = attention_mask(w, slot, positions, slot, positions, valid)  # [B, T, T]
            return m if segments is None else m & (segments[:, :, None] == segments[:, None, :])

        # the kernel takes the segment ids as they are (valid rows: one segment, 1; padding 0)
        x, _ = _run_layers(params, cfg, tokens, positions,
                           _self_attend(cfg, layer_masks(cfg, mask), valid if segments is None else segments), None)
        return x, None
    q_slot = cache.index + jnp.arange(t, dtype=jnp.int32)
    k_pos, k_valid = cache_lib.slot_metadata(cache, positions, valid)
    w = cache.pos.shape[1] if window is None else window
    masks = layer_masks(cfg, lambda win: attention_mask(win, q_slot, positions, jnp.arange(w, dtype=jnp.int32),
                                                         k_pos[:, :w], k_valid[:, :w]))  # [B, T, W]
    write = cache_lib.write_decode if t == 1 else cache_lib.write_prefill
    attend = _cached_attend(cfg, masks, write, cache.index, w)
    x, (ck, cv) = _run_layers(params, cfg, tokens, positions, attend, (cache.k, cache.v))
    return x, KVCache(ck, cv, k_pos, k_valid, cache.index + t)


def forward_shared_prefix(params, cfg: ModelConfig, prefix, prefix_positions, prefix_valid,
                          tokens, positions, valid):
    """Hidden states of several continuations of each prefix, the prefix computed once.

    prefix/prefix_positions/prefix_valid [N, P] (left-padded); tokens/positions/valid [gN, T], row
    j continuing prefix j // g (SPIN: g = 2, a prompt's real and generated responses). Equal to a
    forward over each row's concatenation [prefix, tokens], with the prefix's hidden states and
    keys/values computed once instead of g times. Returns (prefix hidden [N, P, D], hidden [gN, T, D]).

    One layer scan carries a prompt and its continuations side by side as one row [N, P + gT, D]:
    the projections and the MLP are single matmuls over all of them, and attention runs per part
    (the prefix causally on itself, each continuation on its prefix's keys and its own), so each
    layer's weights are sliced, and its gradients written, once.
    """
    n, p = prefix.shape
    g, t = tokens.shape[0] // n, tokens.shape[1]
    slot = jnp.arange(p, dtype=jnp.int32)
    mask_p = layer_masks(cfg, lambda w: attention_mask(w, slot, prefix_positions, slot, prefix_positions, prefix_valid))
    rep = lambda a: jnp.repeat(a, g, axis=0)  # noqa: E731  prefix rows -> their continuations' rows
    k_pos = jnp.concatenate([rep(prefix_positions), positions], axis=1)
    k_valid = jnp.concatenate([rep(prefix_valid), valid], axis=1)
    mask_c = layer_masks(cfg, lambda w: attention_mask(w, p + jnp.arange(t, dtype=jnp.int32), positions,
                                                       jnp.arange(p + t, dtype=jnp.int32), k_pos, k_valid))
    dtype = jnp.dtype(cfg.dtype)
    side = lambda a: a.reshape(n, g * t, *a.shape[2:])  # noqa: E731  [gN, T, ...] -> [N, gT, ...]
    rows = lambda a: a.reshape(g * n, t, *a.shape[2:])  # noqa: E731  [N, gT, ...] -> [gN, T, ...]
    x = constrain(jnp.concatenate([_embed(params, cfg, prefix), side(_embed(params, cfg, tokens))], axis=1),
                  HIDDEN)  # [N, P + gT, D]: a prompt and its continuations side by side, rows over the batch axes
    ropes = _rope_pair(cfg, jnp.concatenate([prefix_positions, side(positions)], axis=1))

    def layer(x, xs):
        lp, local = xs
        lp = _cast(lp, dtype)
        q, k, v = _qkv(cfg, lp, constrain(x, HIDDEN), *pick(ropes, local))  # [N, P + gT, heads, E]
        kt_p, v_p = _kv_layout(k[:, :p], v[:, :p])
        kt_c, v_c = _kv_layout(constrain(rows(k[:, p:]), KV_HEADS), constrain(rows(v[:, p:]), KV_HEADS))
        attn_p = causal(cfg, q[:, :p], kt_p, v_p, mask_p, 0, prefix_valid, prefix_valid, local)
        kt = jnp.concatenate([rep(kt_p), kt_c], axis=-1)
        v = jnp.concatenate([rep(v_p), v_c], axis=-2)
        attn_c = causal(cfg, constrain(rows(q[:, p:]), HEADS), kt, v, mask_c, p, valid, k_valid, local)
        attn = jnp.concatenate([attn_p, side(constrain(attn_c, HEADS))], axis=1)
        return constrain(_attn_out_mlp(cfg, lp, x, attn), HIDDEN), None

    x, _ = jax.lax.scan(_remat(layer, cfg.remat), x, (params["layers"], _local_flags(cfg)), unroll=_unroll(cfg))
    x = _norm(cfg, x, params["final_norm"].astype(dtype))
    return constrain(x[:, :p], HIDDEN), constrain(rows(x[:, p:]), HIDDEN)


def logits_from_hidden(params, cfg: ModelConfig, hidden):
    """[..., D] hidden states -> [..., V] float32 logits."""
    w = output_embedding(params, cfg).astype(hidden.dtype)  # [D, V]
    logits = jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)
    axes = LOGITS if logits.ndim == 3 else (LOGITS[0], LOGITS[-1])  # [B, T, V] or a step's [B, V]
    return softcap(constrain(logits, axes), cfg.final_softcap)


def output_embedding(params, cfg: ModelConfig):
    """The [D, V] output projection (the transposed input embedding when tied)."""
    return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


# ----------------------------------------------------------------------------------------------
# The layer scan and its pieces


def _run_layers(params, cfg: ModelConfig, tokens, positions, attend, kv):
    """Embedding, the decoder layers under lax.scan, final norm. `attend(q, kt, v, kv, layer)`
    returns (attention output [B, T, H, E], kv); kv is the cache's (k, v) or None.
    Returns (hidden [B, T, D], kv)."""
    dtype = jnp.dtype(cfg.dtype)
    x = _embed(params, cfg, tokens)  # [B, T, D]
    ropes = _rope_pair(cfg, positions)  # cos, sin [B, T, E] of global and local layers

    def layer(carry, xs):
        x, kv = carry
        lp, i, local = xs
        lp = _cast(lp, dtype)
        q, k, v = _qkv(cfg, lp, constrain(x, HIDDEN), *pick(ropes, local))
        attn, kv = attend(q, *_kv_layout(k, v), kv, i, local)
        return (constrain(_attn_out_mlp(cfg, lp, x, constrain(attn, HEADS)), HIDDEN), kv), None

    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (x, kv), _ = jax.lax.scan(_remat(layer, cfg.remat), (x, kv), (params["layers"], layer_ids, _local_flags(cfg)),
                              unroll=_unroll(cfg))
    x = _norm(cfg, x, params["final_norm"].astype(dtype))
    return x, kv


def _self_attend(cfg: ModelConfig, masks, segments):
    """Attention of a whole row on itself: query slot i sees key slots <= i (of its own segment:
    `segments` [B, T] is the valid mask, or packed rows' segment ids)."""
    def attend(q, kt, v, kv, layer, local):
        return causal(cfg, q, kt, v, masks, 0, segments, segments, local), kv
    return attend


def _cached_attend(cfg: ModelConfig, masks, write, index, window: int):
    """Attention through the KV cache: `write` stores the layer's keys/values at `index`
    (cache.write_decode or cache.write_prefill), then the queries read slots [0, window)."""
    dtype = jnp.dtype(cfg.dtype)

    def attend(q, kt, v, kv, layer, local):
        ck, cv = kv
        ck, cv, lk, lv = write(ck, cv, layer, kt.astype(ck.dtype), v.astype(cv.dtype), index)
        lk = constrain(lk, cache_lib.CACHE_AXES.k[1:])  # this layer's keys [B, K, E, S], values [B, K, S, E]
        lv = constrain(lv, cache_lib.CACHE_AXES.v[1:])
        kt, v = lk[..., :window].astype(dtype), lv[:, :, :window].astype(dtype)
        return attention(q, kt, v, pick(masks, local), cfg.attn_softcap), (ck, cv)
    return attend


def _qkv(cfg: ModelConfig, lp, x, cos, sin):
    """A layer's queries, keys and values [B, T, heads, E] (RoPE applied) from x [B, T, D].
    Token-major activations; every projection is a plain 2-D [B*T, D] matmul (3-D einsums make
    XLA:CPU transpose gradients through slow fused copies)."""
    b, t, d = x.shape
    h = _norm(cfg, x, lp["attn_norm"]).reshape(b * t, d)
    q, k, v = (constrain(_project(cfg, lp, n, h).reshape(b, t, *lp[n].shape[1:]), axes)
               for n, axes in (("wq", HEADS), ("wk", KV_HEADS), ("wv", KV_HEADS)))
    if cfg.attention_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    if cfg.qk_norm:
        q, k = _norm(cfg, q, lp["q_norm"]), _norm(cfg, k, lp["k_norm"])
    if cfg.query_pre_attn_scalar is not None and cfg.query_pre_attn_scalar != cfg.head_dim:
        # attention scales scores by head_dim ** -0.5; Gemma's scale is query_pre_attn_scalar ** -0.5
        q = (q.astype(jnp.float32) * np.float32(math.sqrt(cfg.head_dim / cfg.query_pre_attn_scalar))).astype(q.dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _kv_layout(k, v):
    """[B, T, K, E] keys and values -> keys transposed [B, K, E, T] and values [B, K, T, E]."""
    return jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3))


def _attn_out_mlp(cfg: ModelConfig, lp, x, attn):
    """The rest of a layer: x + attention's output projection, then x + the gated MLP."""
    b, t, d = x.shape
    out = _project(cfg, lp, "wo", attn.reshape(b * t, -1)).reshape(x.shape)
    x = x + (_norm(cfg, out, lp["post_attn_norm"]) if cfg.sandwich_norms else out)
    h = _norm(cfg, x, lp["mlp_norm"]).reshape(b * t, -1)  # 2-D matmuls
    gate, up = _project(cfg, lp, "w_gate", h), _project(cfg, lp, "w_up", h)
    act = jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
    act = constrain((act * up).reshape(b, t, -1), MLP).reshape(b * t, -1)
    out = _project(cfg, lp, "w_down", act).reshape(x.shape)
    return x + (_norm(cfg, out, lp["post_mlp_norm"]) if cfg.sandwich_norms else out)


# a layer's projections and how many of each weight's axes (after `layers`) are its input
PROJECTION_INPUTS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}


def _project(cfg: ModelConfig, lp, name: str, x2d):
    """x [N, in] times the layer's weight `name`, plus its LoRA update when adapters are attached
    (`spin_jax.model.lora` builds them under params["layers"]["lora"])."""
    adapters = lp.get("lora", {})
    return project(x2d, lp[name], adapters.get(name), cfg.lora_scale, cfg.lora_dropout,
                   adapters.get("dropout_key"), list(PROJECTION_INPUTS).index(name))


def project(x2d, w, adapter=None, scale: float = 1.0, dropout: float = 0.0, key_data=None, index: int = 0):
    """x [N, in] @ W (any [in..., out...] layout, flattened), plus scale * (dropout(x) @ A) @ B
    for a LoRA adapter {"a": [in..., r], "b": [r, out...]}. Dropout (inverted: kept inputs scaled
    by 1 / (1 - dropout)) applies only with `key_data`, a layer's raw key, folded with `index`."""
    n_in = x2d.shape[-1]
    y = jnp.matmul(x2d, w.reshape(n_in, -1))
    if adapter is None:
        return y
    a, b = adapter["a"], adapter["b"]
    r = a.shape[-1]
    h = x2d
    if dropout and key_data is not None:
        keep = jax.random.bernoulli(jax.random.fold_in(jax.random.wrap_key_data(key_data), index), 1.0 - dropout,
                                    h.shape)
        h = jnp.where(keep, h / (1.0 - dropout), 0).astype(h.dtype)
    low = jnp.matmul(h, a.reshape(n_in, r))
    return y + (jnp.matmul(low, b.reshape(r, -1)) * jnp.asarray(scale, low.dtype)).astype(y.dtype)


def _embed(params, cfg: ModelConfig, tokens):
    """Token embeddings in the compute dtype (Gemma: times sqrt(hidden), rounded to that dtype)."""
    dtype = jnp.dtype(cfg.dtype)
    # the table gathered over fsdp like every weight (FSDP), so the lookup needs no whole-batch token ids
    x = constrain(params["embed"].astype(dtype), ("vocab", None))[tokens]
    return constrain(x * jnp.asarray(math.sqrt(cfg.hidden_size), dtype) if cfg.embed_scale else x, HIDDEN)


def _norm(cfg: ModelConfig, x, w):
    return rms_norm(x, w, cfg.rms_norm_eps, cfg.gemma_norm)


def _local_flags(cfg: ModelConfig):
    """[L] bool, scanned with the layers: which layers are local (sliding-window)."""
    return jnp.asarray(cfg.local_layers or (False,) * cfg.num_layers)


def _rope_pair(cfg: ModelConfig, positions):
    """(global, local) RoPE tables (cos, sin); one table twice unless Gemma 3's local layers have
    their own base."""
    tables = rope_tables(cfg, positions)
    if cfg.mixed_layers and cfg.rope_local_theta is not None and cfg.rope_local_theta != cfg.rope_theta:
        return tables, rope_tables(cfg.replace(rope_theta=cfg.rope_local_theta, rope_scaling=None), positions)
    return tables, tables


def _unroll(cfg: ModelConfig):
    """lax.scan's unroll: the whole loop with cfg.unroll_loops (for cost analysis), else none."""
    return True if cfg.unroll_loops else 1


def _cast(tree, dtype):
    """A layer's weights in the compute dtype: floats cast, quantized weights (QLoRA's frozen base)
    dequantized, integer leaves (LoRA dropout keys) kept."""
    def cast(a):
        if quant.is_quantized(a):
            return quant.dequantize(a, dtype)
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
    return jax.tree.map(cast, tree, is_leaf=quant.is_quantized)


def _defaults(tokens, positions, valid):
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if valid is None:
        valid = jnp.ones((b, t), dtype=bool)
    return positions, valid


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    # projection outputs, and attention's output and log-sum-exp (its backward recomputes P from them)
    policy = jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("attn_out", "attn_lse"))
    return jax.checkpoint(fn, policy=policy)


# ----------------------------------------------------------------------------------------------
# Building blocks


def rms_norm(x, w, eps, gemma: bool = False):
    """RMSNorm over the last axis. Llama: normalize in fp32, cast, times w. Gemma: times (1 + w)
    in fp32, then cast."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if gemma:
        return (xf * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return (xf.astype(x.dtype) * w).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    e = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, e, 2, dtype=np.float64) / e))
    rs = cfg.rope_scaling_dict
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = np.where(medium, smoothed, scaled)
    elif rs and rs.get("rope_type", rs.get("type")) == "linear":  # Gemma 3's global layers (4B and up)
        inv = inv / rs["factor"]
    elif rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
        raise NotImplementedError(f"rope_scaling {rs} is not supported (llama3, linear or none)")
    return inv.astype(np.float32)


def rope_tables(cfg: ModelConfig, positions):
    """cos, sin [B, T, E] in float32 for the half-rotation ("rotate_half") convention."""
    inv = jnp.asarray(rope_inv_freq(cfg))
    angles = positions.astype(jnp.float32)[..., None] * inv  # [B, T, E/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """x [B, T, N, E] (token-major); rotate pairs (i, i + E/2)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rot = jnp.concatenate([-x2, x1], axis=-1)
    out = x.astype(jnp.float32) * cos[:, :, None] + rot * sin[:, :, None]
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Parameters (NNX builds them; the forward takes plain pytrees)


def init_params(cfg: ModelConfig, rng: jax.Array):
    """Random params (normal, std 0.02; norms at 1) as a plain pytree of arrays."""
    model = CausalLMParams(cfg, nnx.Rngs(params=rng))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def param_axes(cfg: ModelConfig):
    """The params tree with each leaf replaced by its tuple of logical axis names."""
    abstract = nnx.eval_shape(lambda: CausalLMParams(cfg, nnx.Rngs(params=0)))
    state = nnx.state(abstract, nnx.Param)
    axes = jax.tree.map(lambda v: v.get_metadata()["axes"], state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(axes)


def param_shapes(cfg: ModelConfig):
    """The params tree of jax.ShapeDtypeStruct (no allocation)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def tree_axes(cfg: ModelConfig, params):
    """param_axes for a params tree as it is: a quantized weight's arrays take the weight's axes (a
    block's scale is sharded like the block) and attached LoRA adapters take `adapter_axes`."""
    axes = param_axes(cfg)
    layers = dict(axes["layers"])
    for name, value in params["layers"].items():
        if quant.is_quantized(value):
            layers[name] = {key: axes["layers"][name] for key in value}
    if "lora" in params["layers"]:
        layers["lora"] = adapter_axes(cfg, params["layers"]["lora"])
    return {**axes, "layers": layers}


def adapter_axes(cfg: ModelConfig, adapters: dict) -> dict:
    """Logical axes of LoRA adapters: A [layers, in..., r] takes its weight's input axes, B
    [layers, r, out...] its output axes; the rank is replicated."""
    axes = param_axes(cfg)["layers"]
    out = {}
    for name in adapters:
        if name == "dropout_key":
            out[name] = ("layers", None)
            continue
        w, n = axes[name], PROJECTION_INPUTS[name]
        out[name] = {"a": (w[0], *w[1:1 + n], "lora_rank"), "b": (w[0], "lora_rank", *w[1 + n:])}
    return out


def param_shardings(cfg: ModelConfig, mesh, shapes=None):
    """NamedShardings of the params tree on `mesh` by the rule table."""
    shapes = param_shapes(cfg) if shapes is None else shapes
    return sharding.tree_shardings(tree_axes(cfg, shapes), shapes, mesh)


def shard_params(params, cfg: ModelConfig, mesh, dtype=None):
    """Place a params pytree (numpy or jax) on the mesh by the rule table (a quantized weight's
    arrays keep their dtypes). Without `dtype`, numpy weights become cfg.param_dtype and arrays on
    devices keep theirs; with it, every float weight becomes `dtype` (the sampler's compute dtype)."""
    shardings = param_shardings(cfg, mesh, params)

    def put(x, s):
        if quant.is_quantized(x):
            return {k: jax.device_put(v, s[k]) for k, v in x.items()}
        if dtype is None:
            return jax.device_put(np.asarray(x, dtype=cfg.param_dtype) if not isinstance(x, jax.Array) else x, s)
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        if not isinstance(x, jax.Array):  # cast on the host: less to transfer
            return jax.device_put(np.asarray(x).astype(dtype) if floating else np.asarray(x), s)
        x = jax.device_put(x, s)
        return x.astype(dtype) if floating else x
    return jax.tree.map(put, params, shardings, is_leaf=quant.is_quantized)


class CausalLMParams(nnx.Module):
    """Holds the weights, each annotated with logical axes; the computation is `forward`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        d, f, h, k, e, n = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                            cfg.num_kv_heads, cfg.head_dim, cfg.num_layers)

        def normal(shape, axes):
            return nnx.Param((0.02 * jax.random.normal(rngs.params(), shape)).astype(pd), axes=axes)

        def ones(shape, axes):  # a norm's weight with unit scale: 1, or 0 where it is applied as (1 + w)
            return nnx.Param(jnp.full(shape, 0.0 if cfg.gemma_norm else 1.0, pd), axes=axes)

        self.embed = normal((cfg.vocab_size, d), ("vocab", "embed"))
        layers = dict(
            attn_norm=ones((n, d), ("layers", "norm")),
            wq=normal((n, d, h, e), ("layers", "embed", "heads", "head_dim")),
            wk=normal((n, d, k, e), ("layers", "embed", "kv_heads", "head_dim")),
            wv=normal((n, d, k, e), ("layers", "embed", "kv_heads", "head_dim")),
            wo=normal((n, h, e, d), ("layers", "heads", "head_dim", "embed")),
            mlp_norm=ones((n, d), ("layers", "norm")),
            w_gate=normal((n, d, f), ("layers", "embed", "mlp")),
            w_up=normal((n, d, f), ("layers", "embed", "mlp")),
            w_down=normal((n, f, d), ("layers", "mlp", "embed")),
        )
        if cfg.qk_norm:
            layers.update(q_norm=ones((n, e), ("layers", "head_dim")), k_norm=ones((n, e), ("layers", "head_dim")))
        if cfg.sandwich_norms:
            layers.update(post_attn_norm=ones((n, d), ("layers", "norm")),
                          post_mlp_norm=ones((n, d), ("layers", "norm")))
        if cfg.attention_bias:
            layers.update(bq=normal((n, h, e), ("layers", "heads", "head_dim")),
                          bk=normal((n, k, e), ("layers", "kv_heads", "head_dim")),
                          bv=normal((n, k, e), ("layers", "kv_heads", "head_dim")))
        self.layers = nnx.Dict(layers)
        self.final_norm = ones((d,), ("norm",))
        if not cfg.tie_embeddings:
            self.lm_head = normal((d, cfg.vocab_size), ("embed", "vocab"))
