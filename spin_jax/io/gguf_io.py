"""Read a GGUF file (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3): config, dequantized params,
tokenizer metadata.

Tensors are dequantized by the `gguf` package (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0 and the
k-quants Q4_K, Q5_K, Q6_K, ...). llama.cpp stores Llama and Mistral attn_q / attn_k rows permuted
for its interleaved RoPE; we un-permute them back to the half-rotation layout that HF and
`spin_jax.model` use (Qwen and Gemma files are not permuted). Gemma files store every RMSNorm
weight as 1 + w (llama.cpp's converter adds the 1), so 1 is taken off again. What Gemma's GGUF
metadata leaves out follows llama.cpp and transformers: Gemma 3 puts a global layer after every 5
local ones (Gemma 2 alternates), its local layers use RoPE base 10000, and the attention scale is
head_dim ** -0.5. Tensor names and layouts come from `spin_jax.io.names`.
"""

from __future__ import annotations

import numpy as np

from spin_jax.io import names
from spin_jax.model.config import GEMMA, ModelConfig, gemma_local_layers

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
_PERMUTED = ("llama", "mistral")  # q/k rows permuted for llama.cpp's interleaved RoPE


def read_gguf(path: str):
    """(ModelConfig, params pytree of float32 numpy arrays, metadata dict) from a GGUF file."""

    reader = open_gguf(path)
    cfg, meta, tensors = _read_config(reader, path)
    return cfg, _params(cfg, tensors, path), meta


def read_gguf_config(path: str) -> ModelConfig:
    """The ModelConfig of a GGUF file, from its metadata and tensor names (nothing dequantized)."""
    return _read_config(open_gguf(path), path)[0]


def _read_config(reader, path: str):
    """(ModelConfig, metadata, tensors by name) of an open GGUF file."""
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported ({', '.join(ARCHITECTURES)})")
    tensors = {t.name: t for t in reader.tensors}
    return _config(meta, arch, tensors), meta, tensors


def read_gguf_metadata_only(path: str) -> dict:

    return _metadata(open_gguf(path))


def open_gguf(path: str):
    """gguf.GGUFReader of `path`; a file that is not GGUF, or is cut short, is an error naming it."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # the reader raises ValueError, struct and numpy errors on a damaged file
        raise ValueError(f"{path}: not a readable GGUF file ({(str(e).splitlines() or [''])[0]})") from None


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
    extra = {}
    if arch in GEMMA:
        cap = lambda k: float(g(k)) if g(k) else None  # noqa: E731
        extra = dict(local_layers=gemma_local_layers(arch, int(g("block_count"))), activation="gelu_tanh",
                     query_pre_attn_scalar=float(head_dim), attn_softcap=cap("attn_logit_softcapping"),
                     final_softcap=cap("final_logit_softcapping"),
                     rope_local_theta=10000.0 if arch == "gemma3" else None)
    return ModelConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=int(g("feed_forward_length")),
        num_layers=int(g("block_count")), num_heads=heads,
        num_kv_heads=int(g("attention.head_count_kv", heads)), head_dim=head_dim,
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        max_position_embeddings=int(g("context_length", 8192)),
        tie_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        sliding_window=int(window) if window else None, architecture=arch, **extra)


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
    heads = {"wq": cfg.num_heads, "wk": cfg.num_kv_heads}

    def get(name, key):
        if name not in tensors:
            raise KeyError(f"{path}: tensor {name!r} missing from the GGUF file")
        w = _dequant(tensors[name])
        if key in heads and cfg.architecture in _PERMUTED:
            w = unpermute_rope_rows(w, heads[key])
        if cfg.gemma_norm and name.endswith("norm.weight"):
            w = w - 1.0  # stored as 1 + w
        return w

    return names.params_from_torch(cfg, get, "gguf")
