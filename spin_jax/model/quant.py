"""Block-wise quantized frozen weights (int8 and NF4) for QLoRA, dequantized on the fly.

The base weights of a QLoRA run stay frozen, so they can be stored in 8 or 4 bits and expanded
back to the compute dtype inside the model's matmuls. Weights are stacked per layer (wq
[L, D, H, E], wo [L, H, E, D], w_gate [L, D, F], w_down [L, F, D], ...), and every format here
quantizes in blocks along the LAST axis, so slicing a leading (layer) axis of every array of a
quantized weight, as `jax.lax.scan` does, gives the quantized weight of one layer.

Two kinds, each a plain dict (a pytree node) whose first key names the kind:

    int8: {"int8": int8 codes, w's shape,
           "scale": float32 [..., last / bs]}
        scale = absmax / 127 of each block of bs values, code = round(w / scale) clipped to
        [-127, 127] (round half to even, numpy's rule); a block of zeros has scale 0 and codes 0.
        Dequantized: code * scale.

    nf4:  {"nf4": uint8 [..., last / 2], two 4-bit codes per byte,
           "absmax": float32 [..., last / bs]}
        Each value becomes the index (0..15) of the NF4 level nearest to w / absmax of its block
        (a value exactly half-way between two levels takes the lower one); a block of zeros has
        absmax 0 and index 7 (the level 0). Element 2i of the last axis sits in the low nibble of
        byte i and element 2i + 1 in its high nibble. (bitsandbytes puts the first element in
        the high nibble; the layout here is our own, not bitsandbytes' storage format.)
        Dequantized: NF4_LEVELS[index] * absmax.

`quantize` runs on the host in numpy (float64 arithmetic); `dequantize` is pure jax.numpy, so it
traces under jit, scan and vmap. The product code * scale is taken in float32, then cast to the
requested dtype.

The block size `bs` is `block` (64 by default, the QLoRA choice) when it divides the last axis,
else the largest power of two below it that does (see `block_size`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("int8", "nf4")

# The 16 levels of the 4-bit NormalFloat data type (QLoRA, Dettmers et al. 2023), as in
# bitsandbytes' NF4 table: quantiles of N(0, 1) scaled to [-1, 1], 7 negative and 8 positive
# levels with an exact zero.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)

_INT8_MAX = 127
# Boundaries between neighbouring NF4 levels: a value v gets index searchsorted(_NF4_MIDPOINTS, v).
_NF4_MIDPOINTS = (NF4_LEVELS[:-1].astype(np.float64) + NF4_LEVELS[1:].astype(np.float64)) / 2
# The scale array's key for each kind.
_SCALE_KEY = {"int8": "scale", "nf4": "absmax"}
# The dtype of each array of a quantized weight, by its key.
ARRAY_DTYPES = {"int8": np.int8, "scale": np.float32, "nf4": np.uint8, "absmax": np.float32}


def _check_kind(kind: str) -> None:
    """Raise ValueError unless `kind` is one of KINDS."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantization kind {kind!r}; expected one of {KINDS}")


def block_size(last_dim: int, block: int = 64, kind: str | None = None) -> int:
    """The block length used to quantize a last axis of `last_dim` values.

    `block` itself when it divides `last_dim`, else the largest power of two <= `block` that does.
    With `kind="nf4"`, codes are packed two per byte, so `last_dim` must be even (ValueError
    otherwise) and `block` at least 2; the block returned is then at least 2.
    """
    if last_dim < 1:
        raise ValueError(f"cannot quantize a last axis of length {last_dim}")
    if block < 1:
        raise ValueError(f"block must be a positive integer, got {block}")
    if kind is not None:
        _check_kind(kind)
    if kind == "nf4":
        if last_dim % 2:
            raise ValueError(
                f"nf4 packs two 4-bit codes per byte along the last axis, which needs an even length; got {last_dim}"
            )
        if block < 2:
            raise ValueError(f"nf4 needs a block of at least 2 values, got {block}")
    if last_dim % block == 0:
        return block
    bs = 1 << (block.bit_length() - 1)  # the largest power of two <= block
    while last_dim % bs:
        bs //= 2
    return bs


def quantized_shapes(shape: tuple, kind: str, block: int = 64) -> dict:
    """The shapes, keyed as in `quantize`'s result, of the arrays that quantizing a weight of
    `shape` gives (int8: int8 codes and float32 scale; nf4: uint8 packed codes and float32 absmax).
    For sharding and memory planning without the data."""
    _check_kind(kind)
    shape = tuple(int(n) for n in shape)
    if not shape:
        raise ValueError("cannot quantize a scalar: block-wise quantization needs a last axis")
    *lead, last = shape
    bs = block_size(last, block, kind)
    blocks = (*lead, last // bs)
    if kind == "int8":
        return {"int8": shape, "scale": blocks}
    return {"nf4": (*lead, last // 2), "absmax": blocks}


def quantize(w, kind: str, block: int = 64) -> dict:
    """Quantize `w` (numpy or jax, float32 or bfloat16) block-wise along its last axis, on the host.

    Returns numpy arrays in a dict, as described in the module docstring: {"int8": codes, "scale":
    per-block scale} or {"nf4": packed codes, "absmax": per-block absmax}.
    """
    _check_kind(kind)
    w = np.asarray(w).astype(np.float64)
    shapes = quantized_shapes(w.shape, kind, block)
    *lead, last = w.shape
    bs = block_size(last, block, kind)
    blocks = w.reshape(*lead, last // bs, bs)
    absmax = np.abs(blocks).max(axis=-1, keepdims=True)
    nonzero = absmax > 0
    safe = np.where(nonzero, absmax, 1.0)  # a block of zeros divides by 1 (its codes come out 0)

    if kind == "int8":
        scale = absmax / _INT8_MAX
        codes = np.where(nonzero, np.round(blocks / np.where(nonzero, scale, 1.0)), 0.0)
        codes = np.clip(codes, -_INT8_MAX, _INT8_MAX).astype(np.int8).reshape(w.shape)
        q = {"int8": codes, "scale": scale[..., 0].astype(np.float32)}
    else:
        # Half-way values (x == a midpoint) take the lower level: searchsorted's side="left".
        idx = np.searchsorted(_NF4_MIDPOINTS, blocks / safe, side="left").astype(np.uint8).reshape(w.shape)
        packed = idx[..., 0::2] | (idx[..., 1::2] << 4)
        q = {"nf4": packed.astype(np.uint8), "absmax": absmax[..., 0].astype(np.float32)}

    assert {k: v.shape for k, v in q.items()} == shapes
    return q


def dequantize(q: Mapping, dtype) -> jax.Array:
    """Expand a quantized weight back to its original shape in `dtype` (pure jax.numpy).

    Works on any leading slice of the arrays (under jit, scan or vmap): the block size is read
    from the shapes. The product code * scale is computed in float32, then cast to `dtype`.
    """
    kind = kind_of(q)
    codes = jnp.asarray(q[kind])
    scale = jnp.asarray(q[_SCALE_KEY[kind]], jnp.float32)
    if kind == "int8":
        values = codes.astype(jnp.float32)
    else:
        low = codes & 0x0F
        high = codes >> 4
        idx = jnp.stack([low, high], axis=-1).reshape(*codes.shape[:-1], codes.shape[-1] * 2)
        values = jnp.asarray(NF4_LEVELS)[idx.astype(jnp.int32)]
    *lead, last = values.shape
    nblocks = scale.shape[-1]
    if nblocks == 0 or last % nblocks:
        raise ValueError(f"{kind} codes of last axis {last} do not split into {nblocks} blocks")
    w = values.reshape(*lead, nblocks, last // nblocks) * scale[..., None]
    return w.reshape(values.shape).astype(dtype)


def is_quantized(x) -> bool:
    """Whether `x` is a quantized weight: a dict with an "int8" or "nf4" key."""
    return isinstance(x, Mapping) and any(k in x for k in KINDS)


def kind_of(q: Mapping) -> str:
    """The kind ("int8" or "nf4") of a quantized weight; ValueError for anything else."""
    if isinstance(q, Mapping):
        for kind in KINDS:
            if kind in q:
                return kind
    raise ValueError(f"not a quantized weight (a dict with key 'int8' or 'nf4'): {type(q).__name__}")


def nbytes(q: Mapping) -> int:
    """Bytes held by the arrays of a quantized weight (codes plus scales); also takes
    jax.ShapeDtypeStruct leaves."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in q.values())


def quantize_tree(params_layers: Mapping, names: Iterable[str], kind: str, block: int = 64) -> dict:
    """A shallow copy of `params_layers` whose entries named in `names` are replaced by their
    `quantize(..., kind, block)`; the other entries are the same objects. KeyError if a name is
    missing, ValueError if an entry is already quantized."""
    _check_kind(kind)
    if isinstance(names, str):
        names = (names,)
    out = dict(params_layers)
    for name in names:
        if name not in out:
            raise KeyError(f"no weight named {name!r} to quantize; have {sorted(out)}")
        if is_quantized(out[name]):
            raise ValueError(f"weight {name!r} is already quantized ({kind_of(out[name])})")
        out[name] = quantize_stacked(out[name], kind, block)
    return out


def quantize_stacked(w, kind: str, block: int = 64) -> dict:
    """`quantize` of a weight stacked along its first (layer) axis, one layer at a time, so the
    host's float64 temporaries are one layer's (a 7B model's stacked MLP weight is 1.9G values).
    Equal to quantize(w, kind, block), since blocks run along the last axis."""
    w = np.asarray(w)
    if w.ndim < 2:
        return quantize(w, kind, block)
    shapes = quantized_shapes(w.shape, kind, block)
    out = {key: np.empty(shape, ARRAY_DTYPES[key]) for key, shape in shapes.items()}
    for i in range(w.shape[0]):
        for key, value in quantize(w[i], kind, block).items():
            out[key][i] = value
    return out
