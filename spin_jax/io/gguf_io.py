"""Read a Llama-family GGUF file: config, dequantized params, tokenizer metadata.

GGUF (llama.cpp) stores attn_q / attn_k rows permuted for its interleaved RoPE; we un-permute
them back to the half-rotation layout that HF and `spin_jax.model` use.
"""

from __future__ import annotations

import numpy as np

from spin_jax.model.config import ModelConfig


def read_gguf(path: str):
    """(ModelConfig, params pytree of float32 numpy arrays, metadata dict) from a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (llama, mistral, qwen2)")
    tensors = {t.name: t for t in reader.tensors}
    cfg = _config(meta, arch, tensors)
    params = _params(cfg, tensors, path)
    return cfg, params, meta


def read_gguf_metadata_only(path: str) -> dict:
    import gguf

    return _metadata(gguf.GGUFReader(path))


def _metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # pragma: no cover - exotic field types we never read
            continue
    return meta


def _config(meta: dict, arch: str, tensors) -> ModelConfig:
    g = lambda k, default=None: meta.get(f"{arch}.{k}", default)  # noqa: E731
    d = int(g("embedding_length"))
    heads = int(g("attention.head_count"))
    head_dim = int(g("attention.key_length", d // heads))
    vocab = int(g("vocab_size", len(meta.get("tokenizer.ggml.tokens", []))))
    window = g("attention.sliding_window")
    return ModelConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=int(g("feed_forward_length")),
        num_layers=int(g("block_count")), num_heads=heads,
        num_kv_heads=int(g("attention.head_count_kv", heads)), head_dim=head_dim,
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        max_position_embeddings=int(g("context_length", 8192)),
        tie_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        sliding_window=int(window) if window else None,
        architecture=arch)


def _dequant(t) -> np.ndarray:
    import gguf

    arr = gguf.quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first
    return np.asarray(arr, dtype=np.float32).reshape(shape)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's permute: rows [H, E/2, 2, ...] (interleaved) -> [H, 2, E/2, ...]."""
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _params(cfg: ModelConfig, tensors, path: str):
    h, k, e, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size

    def get(name):
        if name not in tensors:
            raise KeyError(f"{path}: tensor {name!r} missing from the GGUF file")
        return _dequant(tensors[name])

    per_layer = {key: [] for key in ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm",
                                     "w_gate", "w_up", "w_down")}
    if cfg.attention_bias:
        per_layer.update(bq=[], bk=[], bv=[])
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        # torch-style [out, in] matrices; q/k rows need un-permuting unless qwen2 (not permuted).
        wq, wk = get(p + "attn_q.weight"), get(p + "attn_k.weight")
        if cfg.architecture != "qwen2":
            wq, wk = unpermute_rope_rows(wq, h), unpermute_rope_rows(wk, k)
        per_layer["attn_norm"].append(get(p + "attn_norm.weight"))
        per_layer["wq"].append(wq.T.reshape(d, h, e))
        per_layer["wk"].append(wk.T.reshape(d, k, e))
        per_layer["wv"].append(get(p + "attn_v.weight").T.reshape(d, k, e))
        per_layer["wo"].append(get(p + "attn_output.weight").T.reshape(h, e, d))
        per_layer["mlp_norm"].append(get(p + "ffn_norm.weight"))
        per_layer["w_gate"].append(get(p + "ffn_gate.weight").T)
        per_layer["w_up"].append(get(p + "ffn_up.weight").T)
        per_layer["w_down"].append(get(p + "ffn_down.weight").T)
        if cfg.attention_bias:
            per_layer["bq"].append(get(p + "attn_q.bias").reshape(h, e))
            per_layer["bk"].append(get(p + "attn_k.bias").reshape(k, e))
            per_layer["bv"].append(get(p + "attn_v.bias").reshape(k, e))
    params = {
        "embed": get("token_embd.weight"),
        "layers": {key: np.stack(v) for key, v in per_layer.items()},
        "final_norm": get("output_norm.weight"),
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = get("output.weight").T
    return params
