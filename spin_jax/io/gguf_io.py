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

import dataclasses
import struct

import numpy as np

from spin_jax.io import names
from spin_jax.model.config import GEMMA, ModelConfig, gemma_local_layers

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
_PERMUTED = ("llama", "mistral")  # q/k rows permuted for llama.cpp's interleaved RoPE


def read_gguf(path: str):
    """(ModelConfig, params pytree of float32 numpy arrays, metadata dict) from a GGUF file."""

    gf = open_gguf(path)
    cfg = _config_of(gf, path)
    return cfg, _params(cfg, gf.tensors, path), gf.metadata


def read_gguf_config(path: str) -> ModelConfig:
    """The ModelConfig of a GGUF file, from its metadata and tensor names (nothing dequantized)."""
    return _config_of(open_gguf(path), path)


def _config_of(gf: GGUFFile, path: str) -> ModelConfig:
    arch = gf.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported ({', '.join(ARCHITECTURES)})")
    return _config(gf.metadata, arch, gf.tensors)


def read_gguf_metadata_only(path: str) -> dict:
    return open_gguf(path).metadata


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: int  # a ggml type (gguf.GGMLQuantizationType)
    shape: tuple  # GGUF's order: fastest-varying dimension first
    data: np.ndarray  # the raw bytes (a memory map), for gguf.quants.dequantize


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    metadata: dict  # key -> str, int, float, bool or a list of them
    tensors: dict  # name -> GGUFTensor


def open_gguf(path: str) -> GGUFFile:
    """The metadata and tensors of a GGUF file (version 2 or 3, little-endian). A file that is not
    GGUF, or is cut short, is an error naming it.

    gguf's own GGUFReader builds a numpy view per array element: 15 s for the 262,144-token
    vocabulary of Gemma 3's metadata. Here numeric arrays are one `frombuffer` each, strings one
    slice each, and tensor data stays memory-mapped until it is dequantized."""
    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:  # an empty file cannot be mapped
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None
    try:
        return _parse(buf)
    except Exception as e:  # struct, index, unicode and numpy errors on a damaged file
        raise ValueError(f"{path}: not a readable GGUF file ({(str(e).splitlines() or [''])[0]})") from None


_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
            11: "<i8", 12: "<f8"}  # GGUF value types; 7 is bool, 8 string, 9 array
_STRING, _ARRAY, _BOOL = 8, 9, 7


def _parse(buf: np.ndarray) -> GGUFFile:
    import gguf

    mv = memoryview(buf)
    if bytes(mv[:4]) != b"GGUF":
        raise ValueError("no GGUF magic at the start")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", mv, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (2 and 3 little-endian are read)")
    pos = 24

    def string(pos):
        (n,) = struct.unpack_from("<Q", mv, pos)
        end = pos + 8 + n
        if end > len(mv):
            raise ValueError("cut short")
        return bytes(mv[pos + 8:end]).decode("utf-8", errors="replace"), end

    def value(kind, pos):
        if kind == _STRING:
            return string(pos)
        if kind == _ARRAY:
            sub, n = struct.unpack_from("<IQ", mv, pos)
            pos += 12
            if sub == _STRING:
                out = []
                for _ in range(n):
                    s, pos = string(pos)
                    out.append(s)
                return out, pos
            if sub not in _SCALARS:
                raise ValueError(f"array of GGUF value type {sub}")
            dt = np.dtype(_SCALARS[sub])
            arr = np.frombuffer(mv, dt, count=n, offset=pos)
            return (arr.astype(bool) if sub == _BOOL else arr).tolist(), pos + n * dt.itemsize
        if kind not in _SCALARS:
            raise ValueError(f"GGUF value type {kind}")
        dt = np.dtype(_SCALARS[kind])
        v = np.frombuffer(mv, dt, count=1, offset=pos)[0].item()
        return (bool(v) if kind == _BOOL else v), pos + dt.itemsize

    meta = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", mv, pos)
        meta[key], pos = value(kind, pos + 4)
    infos = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", mv, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", mv, pos + 4)
        kind, offset = struct.unpack_from("<IQ", mv, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, dims, kind, offset))
    align = int(meta.get("general.alignment", 32))
    start = -(-pos // align) * align
    tensors = {}
    for name, dims, kind, offset in infos:
        qtype = gguf.GGMLQuantizationType(kind)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(dims, dtype=np.int64)) * type_size // block
        lo = start + offset
        if lo + n_bytes > len(buf):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        rows = tuple(reversed(dims))
        data = buf[lo:lo + n_bytes].reshape(*rows[:-1], rows[-1] * type_size // block)
        if name in tensors:
            raise ValueError(f"tensor {name!r} appears twice")
        tensors[name] = GGUFTensor(name, qtype, tuple(int(d) for d in dims), data)
    return GGUFFile(meta, tensors)


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
