"""One table from our params tree to the tensor names of HF safetensors and of GGUF files.

Both formats store torch Linear weights as [out, in]; our params use [in, ...out] layouts (see
`spin_jax.model.transformer`). `params_from_torch` and `params_to_torch` convert with the table,
whatever the file format: the readers hand in a `get(name)` for their own names.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

# our layer key, HF name under model.layers.<i>., GGUF name under blk.<i>., kind of conversion
LAYER_TENSORS = (
    ("attn_norm", "input_layernorm.weight", "attn_norm.weight", "vector"),
    ("mlp_norm", "post_attention_layernorm.weight", "ffn_norm.weight", "vector"),
    ("wq", "self_attn.q_proj.weight", "attn_q.weight", "in_heads"),
    ("wk", "self_attn.k_proj.weight", "attn_k.weight", "in_kv_heads"),
    ("wv", "self_attn.v_proj.weight", "attn_v.weight", "in_kv_heads"),
    ("wo", "self_attn.o_proj.weight", "attn_output.weight", "heads_out"),
    ("w_gate", "mlp.gate_proj.weight", "ffn_gate.weight", "matrix"),
    ("w_up", "mlp.up_proj.weight", "ffn_up.weight", "matrix"),
    ("w_down", "mlp.down_proj.weight", "ffn_down.weight", "matrix"),
)
BIAS_TENSORS = (  # Qwen2's q/k/v biases
    ("bq", "self_attn.q_proj.bias", "attn_q.bias", "heads"),
    ("bk", "self_attn.k_proj.bias", "attn_k.bias", "kv_heads"),
    ("bv", "self_attn.v_proj.bias", "attn_v.bias", "kv_heads"),
)
# our top-level key, HF name, GGUF name, kind
GLOBAL_TENSORS = (
    ("embed", "model.embed_tokens.weight", "token_embd.weight", "vector"),
    ("final_norm", "model.norm.weight", "output_norm.weight", "vector"),
    ("lm_head", "lm_head.weight", "output.weight", "matrix"),
)
FORMATS = {"hf": (1, "model.layers.{i}."), "gguf": (2, "blk.{i}.")}


QK_NORM_TENSORS = (  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k
    ("q_norm", "self_attn.q_norm.weight", "attn_q_norm.weight", "vector"),
    ("k_norm", "self_attn.k_norm.weight", "attn_k_norm.weight", "vector"),
)
# Gemma's four norms per layer: HF's post_attention_layernorm is the norm after attention there,
# and pre_feedforward_layernorm the one before the MLP (Llama's post_attention_layernorm)
SANDWICH_TENSORS = (
    ("attn_norm", "input_layernorm.weight", "attn_norm.weight", "vector"),
    ("post_attn_norm", "post_attention_layernorm.weight", "post_attention_norm.weight", "vector"),
    ("mlp_norm", "pre_feedforward_layernorm.weight", "ffn_norm.weight", "vector"),
    ("post_mlp_norm", "post_feedforward_layernorm.weight", "post_ffw_norm.weight", "vector"),
)


def layer_tensors(cfg):
    base = LAYER_TENSORS
    if cfg.sandwich_norms:
        base = SANDWICH_TENSORS + tuple(t for t in LAYER_TENSORS if t[0] not in ("attn_norm", "mlp_norm"))
    return (base + (BIAS_TENSORS if cfg.attention_bias else ())
            + (QK_NORM_TENSORS if cfg.qk_norm else ()))


def global_tensors(cfg):
    return tuple(t for t in GLOBAL_TENSORS if t[0] != "lm_head" or not cfg.tie_embeddings)


def tensor_name(fmt: str, entry: tuple, layer: int | None = None) -> str:
    col, prefix = FORMATS[fmt]
    return (prefix.format(i=layer) if layer is not None else "") + entry[col]


def params_from_torch(cfg, get: Callable[[str, str], np.ndarray], fmt: str) -> dict:
    """Our params pytree (float32 numpy) from torch-layout tensors; get(name, our key) returns the
    [out, in] (or 1-D) array stored under `name` in format `fmt` ("hf" or "gguf")."""
    layers = {}
    for entry in layer_tensors(cfg):
        key, kind = entry[0], entry[3]
        layers[key] = np.stack([_to_ours(kind, get(tensor_name(fmt, entry, i), key), cfg)
                                for i in range(cfg.num_layers)])
    params = {key: _to_ours(kind, get(tensor_name(fmt, entry), key), cfg)
              for entry in global_tensors(cfg) for key, kind in [(entry[0], entry[3])]}
    params["layers"] = layers
    return params


def params_to_torch(params, cfg, fmt: str = "hf") -> dict:
    """Our params pytree -> {name in `fmt`: [out, in] float32 numpy array}."""
    out = {}
    for entry in global_tensors(cfg):
        out[tensor_name(fmt, entry)] = _to_torch(entry[3], np.asarray(params[entry[0]], np.float32), cfg)
    for entry in layer_tensors(cfg):
        stacked = np.asarray(params["layers"][entry[0]], np.float32)
        for i in range(cfg.num_layers):
            out[tensor_name(fmt, entry, i)] = _to_torch(entry[3], stacked[i], cfg)
    return out


def _to_ours(kind: str, w: np.ndarray, cfg) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    h, k, e, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    if kind == "vector":  # norms and the [V, D] embedding are stored as they are
        return w
    if kind == "matrix":
        return w.T
    if kind == "in_heads":
        return w.T.reshape(d, h, e)
    if kind == "in_kv_heads":
        return w.T.reshape(d, k, e)
    if kind == "heads_out":
        return w.T.reshape(h, e, d)
    if kind == "heads":
        return w.reshape(h, e)
    if kind == "kv_heads":
        return w.reshape(k, e)
    raise ValueError(kind)


def _to_torch(kind: str, w: np.ndarray, cfg) -> np.ndarray:
    d = cfg.hidden_size
    if kind == "vector":
        return w
    if kind == "matrix":
        return w.T
    if kind in ("in_heads", "in_kv_heads"):
        return w.reshape(d, -1).T
    if kind == "heads_out":
        return w.reshape(-1, d).T
    if kind in ("heads", "kv_heads"):
        return w.reshape(-1)
    raise ValueError(kind)
