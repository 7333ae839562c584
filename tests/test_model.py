"""The model on its own (no torch): KV-cache decode, left padding, the layer scan, the axes, and
shared-prefix scoring against whole rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spin_jax import scoring
from spin_jax.data import tokenize
from spin_jax.model import cache as cache_lib
from spin_jax.model import transformer
from spin_jax.model.config import tiny_config

from reference import whole_row_logps


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_kv_cache_decode_equals_full_forward(arch):
    cfg = tiny_config(arch)
    params = transformer.init_params(cfg, jax.random.key(2))
    b, t, prefill = 2, 11, 5
    tokens = jax.random.randint(jax.random.key(3), (b, t), 0, cfg.vocab_size)
    full, _ = transformer.forward(params, cfg, tokens)
    cache = cache_lib.init_cache(cfg, b, 16)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    logits, cache = transformer.forward(params, cfg, tokens[:, :prefill], pos[:, :prefill], cache=cache)
    steps = [logits]
    step = jax.jit(lambda p, tok, ps, c: transformer.forward(p, cfg, tok, ps, cache=c))
    for i in range(prefill, t):
        logits, cache = step(params, tokens[:, i:i + 1], pos[:, i:i + 1], cache)
        steps.append(logits)
    assert rel_err(jnp.concatenate(steps, axis=1), full) <= 1e-5


def test_left_padding_does_not_change_logits():
    cfg = tiny_config("mistral")
    params = transformer.init_params(cfg, jax.random.key(4))
    tokens = jax.random.randint(jax.random.key(5), (1, 9), 0, cfg.vocab_size)
    alone, _ = transformer.forward(params, cfg, tokens)
    pad = 3
    padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), tokens], axis=1)
    valid = jnp.arange(9 + pad)[None] >= pad
    pos = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    out, _ = transformer.forward(params, cfg, padded, pos, valid)
    assert rel_err(out[:, pad:], alone) <= 1e-5


def test_scan_compile_time_independent_of_depth():
    """The layer stack is one scanned body: the HLO does not grow with the number of layers."""
    sizes = []
    for n in (2, 8):
        cfg = tiny_config("llama", num_layers=n)
        shapes = transformer.param_shapes(cfg)
        tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        text = jax.jit(lambda p, t: transformer.forward(p, cfg, t)[0]).lower(shapes, tokens).as_text()
        sizes.append(len(text))
    assert abs(sizes[1] - sizes[0]) < 0.02 * sizes[0]


def test_param_axes_cover_every_weight():
    cfg = tiny_config("qwen2")
    shapes = transformer.param_shapes(cfg)
    axes = transformer.param_axes(cfg)
    flat_s = jax.tree_util.tree_leaves_with_path(shapes)
    flat_a = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple)))
    for path, s in flat_s:
        assert len(flat_a[path]) == len(s.shape), path


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
@pytest.mark.parametrize("group", [1, 2, 3])
def test_shared_prompt_scoring_equals_whole_rows(arch, group):
    """Grouped batches (each prompt computed once for its `group` responses, logits on responses
    only) score exactly what whole [prompt + response] rows score: Mistral's window of 4 cuts
    across the prompt/response boundary here."""
    cfg = tiny_config(arch)
    params = transformer.init_params(cfg, jax.random.key(3))
    rng = np.random.default_rng(group)
    prompts = [list(rng.integers(3, 128, size=rng.integers(1, 9))) for _ in range(3)]
    responses = [list(rng.integers(3, 128, size=rng.integers(1, 12))) for _ in range(3 * group)]
    grouped = tokenize.pack_grouped(prompts, responses, 8, 16)
    whole = tokenize.pack([p for p in prompts for _ in range(group)], responses, 8, 16)
    ref = np.asarray(jax.jit(lambda p, b: whole_row_logps(p, cfg, b))(params, whole))
    for block in (0, 3):  # whole attention; query blocks of 3 (8 prompt and 15 response queries)
        c = cfg.replace(attn_block=block)
        got = np.asarray(jax.jit(lambda p, b: scoring.batch_logps(p, c, b, 40))(params, grouped))
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
