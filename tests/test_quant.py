"""Block-wise int8 and NF4 quantization of frozen weights (`spin_jax.model.quant`): the NF4 table
against the published values, quantize + dequantize against an independent float64 reference,
round-trip error on normal weights, the nibble layout, block sizes, shapes and bytes, and
dequantizing under jit, scan and vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spin_jax.model import quant

# The NF4 levels as published (QLoRA, Dettmers et al. 2023; bitsandbytes csrc/kernels.cu, nf4 table).
PUBLISHED_NF4 = [
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
]


def reference_roundtrip(w: np.ndarray, kind: str, bs: int) -> np.ndarray:
    """Quantize and dequantize `w` in float64 with plain loops over blocks of `bs` values along the
    last axis: int8 scales each block by absmax / 127 and rounds, nf4 takes the nearest published
    level (argmin, the lower one on a tie) of w / absmax."""
    levels = np.array(PUBLISHED_NF4, np.float32).astype(np.float64)
    flat = np.asarray(w, np.float64).reshape(-1, w.shape[-1])
    out = np.zeros_like(flat)
    for r in range(flat.shape[0]):
        for start in range(0, flat.shape[1], bs):
            block = flat[r, start:start + bs]
            absmax = np.max(np.abs(block))
            if absmax == 0:
                continue
            if kind == "int8":
                scale = absmax / 127
                codes = np.clip(np.round(block / scale), -127, 127)
                out[r, start:start + bs] = codes * float(np.float32(scale))
            else:
                for j, x in enumerate(block / absmax):
                    nearest = np.argmin(np.abs(levels - x))
                    out[r, start:start + bs][j] = levels[nearest] * float(np.float32(absmax))
    return out.reshape(w.shape)


def test_nf4_levels_match_the_published_table():
    levels = quant.NF4_LEVELS
    assert levels.dtype == np.float32 and levels.shape == (16,)
    assert np.all(np.diff(levels) > 0)
    assert levels[0] == -1.0 and levels[-1] == 1.0
    assert np.count_nonzero(levels == 0.0) == 1
    np.testing.assert_allclose(levels, PUBLISHED_NF4, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", quant.KINDS)
@pytest.mark.parametrize("shape", [(2, 64, 4, 16), (3, 128, 96)])
@pytest.mark.parametrize("block", [64, 8])
def test_roundtrip_equals_float64_reference(kind, shape, block):
    rng = np.random.default_rng(len(shape) * 100 + block)
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    w[0, 0] = 0.0  # blocks of zeros: scale 0, dequantized 0
    bs = quant.block_size(shape[-1], block, kind)
    assert bs == {(16, 64): 16, (16, 8): 8, (96, 64): 32, (96, 8): 8}[shape[-1], block]
    q = quant.quantize(w, kind, block)
    got = np.asarray(quant.dequantize(q, jnp.float32), np.float64)
    want = reference_roundtrip(w, kind, bs)
    assert got.shape == w.shape
    assert np.all(got[0, 0] == 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


def test_roundtrip_error_on_normal_weights():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4096, 1024)) * 0.02).astype(np.float32)
    errors = {}
    for kind in quant.KINDS:
        got = np.asarray(quant.dequantize(quant.quantize(w, kind), jnp.float32), np.float64)
        diff = got - w
        errors[kind] = (np.linalg.norm(diff) / np.linalg.norm(w), np.max(np.abs(diff)))
        print(f"{kind}: relative Frobenius error {errors[kind][0]:.5f}, max abs error {errors[kind][1]:.3e}")
    assert errors["int8"][0] < 0.008  # measured 0.0059 (seed 0)
    assert errors["nf4"][0] < 0.10  # measured 0.092 (seed 0)
    # Worst case is half a step: absmax / 254 for int8, the widest NF4 gap / 2 times absmax for nf4.
    absmax = np.max(np.abs(w))
    assert errors["int8"][1] <= absmax / 254 * (1 + 1e-5)
    assert errors["nf4"][1] <= absmax * np.max(np.diff(quant.NF4_LEVELS)) / 2 * (1 + 1e-5)


def test_nf4_nibble_order():
    # Indices: -1 -> 0, 0 -> 7, 1 -> 15; element 2i in the low nibble of byte i, 2i + 1 in the high.
    w = np.array([[-1.0, 1.0, 1.0, -1.0, 0.0, 1.0, 0.0, 0.0]], np.float32)
    q = quant.quantize(w, "nf4", block=8)
    assert q["nf4"].dtype == np.uint8
    assert q["nf4"].tolist() == [[0xF0, 0x0F, 0xF7, 0x77]]
    assert q["absmax"].tolist() == [[1.0]]
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q, jnp.float32)), w)


def test_nf4_ties_take_the_lower_level():
    # float32 midpoints between levels 7 and 8 (0 and 0.0796) and between 14 and 15, with absmax 1.
    lo = float((np.float64(quant.NF4_LEVELS[7]) + np.float64(quant.NF4_LEVELS[8])) / 2)
    hi = float((np.float64(quant.NF4_LEVELS[14]) + np.float64(quant.NF4_LEVELS[15])) / 2)
    w = np.array([[lo, 1.0, hi, 1.0]], np.float64)
    q = quant.quantize(w, "nf4", block=4)
    assert q["nf4"].tolist() == [[7 | 15 << 4, 14 | 15 << 4]]


def test_int8_codes_and_scale():
    w = np.array([[0.5, -1.27, 0.0, 0.004, 0.0, 0.0, 0.0, 0.0]], np.float32)
    q = quant.quantize(w, "int8", block=4)
    assert q["int8"].dtype == np.int8 and q["scale"].dtype == np.float32
    assert q["int8"].tolist() == [[50, -127, 0, 0, 0, 0, 0, 0]]
    np.testing.assert_allclose(q["scale"], [[0.01, 0.0]], rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(quant.dequantize(q, jnp.float32))))


def test_block_size_choice_and_odd_nf4_error():
    assert quant.block_size(1024) == 64
    assert quant.block_size(96) == 32
    assert quant.block_size(100) == 4
    assert quant.block_size(48, 64) == 16
    assert quant.block_size(96, 48) == 48
    assert quant.block_size(7, 64) == 1
    assert quant.block_size(6, 64, "nf4") == 2
    with pytest.raises(ValueError, match="even length"):
        quant.block_size(7, 64, "nf4")
    with pytest.raises(ValueError, match="even length"):
        quant.quantize(np.ones((3, 5), np.float32), "nf4")
    with pytest.raises(ValueError, match="even length"):
        quant.quantized_shapes((3, 5), "nf4")
    with pytest.raises(ValueError, match="unknown quantization kind"):
        quant.quantize(np.ones((3, 4), np.float32), "int4")


@pytest.mark.parametrize("kind", quant.KINDS)
@pytest.mark.parametrize("shape", [(2, 64, 4, 16), (2, 16, 96), (3, 6)])
def test_quantized_shapes_match_quantize(kind, shape):
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    q = quant.quantize(w, kind)
    assert {k: v.shape for k, v in q.items()} == quant.quantized_shapes(shape, kind)
    assert list(q) == list(quant.quantized_shapes(shape, kind))


def test_nbytes():
    shape = (2, 128, 256)
    w = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    n = w.size
    nf4 = quant.quantize(w, "nf4")
    int8 = quant.quantize(w, "int8")
    assert quant.nbytes(nf4) == n * (0.5 + 4 / 64)
    assert quant.nbytes(int8) == n * (1 + 4 / 64)
    structs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in nf4.items()}
    assert quant.nbytes(structs) == quant.nbytes(nf4)


@pytest.mark.parametrize("kind", quant.KINDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dequantize_under_jit_scan_and_vmap(kind, dtype):
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((3, 32, 4, 16)) * 0.02, jnp.bfloat16)  # [L, D, H, E]
    q = quant.quantize(w, kind, block=64)  # E = 16 -> blocks of 16
    full = quant.dequantize(q, jnp.float32)
    assert full.dtype == jnp.float32 and full.shape == w.shape
    want = full.astype(dtype)

    eager = quant.dequantize(q, dtype)
    jitted = jax.jit(lambda q: quant.dequantize(q, dtype))(q)

    def per_layer(carry, q_layer):
        return carry, quant.dequantize(q_layer, dtype)

    _, scanned = jax.jit(lambda q: jax.lax.scan(per_layer, None, q))(q)
    vmapped = jax.vmap(lambda q_layer: quant.dequantize(q_layer, dtype))(q)
    for got in (eager, jitted, scanned, vmapped):
        assert got.dtype == dtype and got.shape == w.shape
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # A matmul through the dequantized weight, as the model does with one layer's slice.
    x = jnp.ones((2, 32), dtype)
    y = jax.jit(lambda x, q: jnp.einsum("bd,dhe->bhe", x, quant.dequantize(q, dtype)))(
        x, jax.tree.map(lambda a: a[1], q)
    )
    assert y.shape == (2, 4, 16) and y.dtype == dtype


def test_is_quantized_and_kind_of():
    q8 = quant.quantize(np.ones((2, 8), np.float32), "int8")
    q4 = quant.quantize(np.ones((2, 8), np.float32), "nf4")
    assert quant.is_quantized(q8) and quant.kind_of(q8) == "int8"
    assert quant.is_quantized(q4) and quant.kind_of(q4) == "nf4"
    assert not quant.is_quantized(np.ones(3))
    assert not quant.is_quantized({"scale": np.ones(3)})
    with pytest.raises(ValueError, match="not a quantized weight"):
        quant.kind_of({"w": np.ones(3)})


def test_quantize_tree():
    rng = np.random.default_rng(4)
    layers = {
        "wq": rng.standard_normal((2, 16, 4, 8)).astype(np.float32),
        "w_down": rng.standard_normal((2, 32, 16)).astype(np.float32),
        "norm": np.ones((2, 16), np.float32),
    }
    out = quant.quantize_tree(layers, ["wq", "w_down"], "nf4", block=8)
    assert out is not layers and set(out) == set(layers)
    assert not quant.is_quantized(layers["wq"])  # the input is left as it was
    assert out["norm"] is layers["norm"]
    for name in ("wq", "w_down"):
        assert quant.kind_of(out[name]) == "nf4"
        np.testing.assert_array_equal(out[name]["nf4"], quant.quantize(layers[name], "nf4", 8)["nf4"])
    with pytest.raises(KeyError, match="wk"):
        quant.quantize_tree(layers, ["wk"], "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize_tree(out, ["wq"], "int8")


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantize_stacked_equals_quantize(kind):
    """Layer by layer (what quantize_tree does) gives the whole-array result exactly."""
    w = np.random.default_rng(5).standard_normal((3, 32, 4, 128)).astype(np.float32) * 0.02
    whole, stacked = quant.quantize(w, kind), quant.quantize_stacked(w, kind)
    assert whole.keys() == stacked.keys()
    for key in whole:
        assert stacked[key].dtype == whole[key].dtype
        np.testing.assert_array_equal(stacked[key], whole[key])
