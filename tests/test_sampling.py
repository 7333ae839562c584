"""The jitted sampler: greedy parity with transformers, sampling law (chi-square), seeds, meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spin_jax import sharding
from spin_jax.data import tokenize
from spin_jax.model import transformer
from spin_jax.model.config import tiny_config
from spin_jax.sampling import Sampler, SamplingParams, masked_logits

from reference import whole_row_logps

PROMPTS = [
    "What is the capital of France?", "Write a short poem about the sea.", "Explain recursion in one sentence.",
    "List three fruits.", "How do I boil an egg?", "Translate 'good morning' into Spanish.",
    "What is 17 times 3?", "Give me a tip for learning to code.", "Why is the sky blue?",
    "Describe a cat in two sentences.", "What does a CPU do?", "Suggest a name for a pet turtle.",
    "What is photosynthesis?", "Write a haiku about autumn.", "How many continents are there?",
    "What is the boiling point of water?", "Recommend a book for a long flight.",
    "What is the difference between weather and climate?", "How do vaccines work?",
    "Tell me a fun fact about octopuses.",
]


def greedy_identical(model, torch_model, stop: int, max_new_tokens: int = 64) -> int:
    """How many of PROMPTS our greedy sampler continues exactly as transformers' `generate` (one
    left-padded batch on both sides), up to and including the `stop` token. On one device: that 8
    devices in every decode layout give the 1-device tokens is test_greedy_on_8_device_mesh_equals_one_device
    (8 simulated devices on a 2-core CPU take 6x the time and 3.5x the memory)."""
    import torch

    tok = model.tokenizer
    ids = [tokenize.prompt_ids(tok, p) for p in PROMPTS]
    sampler = Sampler(model.cfg, sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), batch_size=len(ids),
                      pad_id=tok.pad_token_id)
    sp = SamplingParams(max_new_tokens=max_new_tokens, greedy=True, stop_ids=(stop,))
    ours = sampler.generate(sampler.place(model.params), ids, sp)
    width = max(map(len, ids))
    batch = torch.tensor([[tok.pad_token_id] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    with torch.no_grad():
        g = torch_model.generate(batch, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop, pad_token_id=tok.pad_token_id)
    same = 0
    for row, o in zip(g[:, width:].tolist(), ours):
        end = row.index(stop) + 1 if stop in row else len(row)
        same += row[:end] == o.tokens
    return same


def test_greedy_matches_transformers_generate(smollm2, smollm2_torch):
    same = greedy_identical(smollm2, smollm2_torch, smollm2.tokenizer.eos_token_id)
    assert same >= 19, f"{same}/20 identical"


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config("llama", vocab_size=32)
    params = transformer.init_params(cfg, jax.random.key(0))
    params["embed"] = params["embed"] * 40  # a peaked but not degenerate next-token distribution
    return cfg, params


@pytest.mark.parametrize("sp", [SamplingParams(max_new_tokens=1, temperature=0.7),
                                SamplingParams(max_new_tokens=1, temperature=1.3, top_k=5),
                                SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.8)])
def test_first_token_distribution_chi_square(tiny, sp):
    from scipy import stats

    cfg, params = tiny
    prompt = [3, 7, 1, 4]
    logits, _ = transformer.forward(params, cfg, jnp.array([prompt]))
    probs = np.asarray(jax.nn.softmax(masked_logits(logits[:, -1], sp), -1)[0], np.float64)
    n_rows = 64
    sampler = Sampler(cfg, batch_size=n_rows, min_prompt_bucket=4)
    placed = sampler.place(params)
    counts = np.zeros(cfg.vocab_size)
    for seed in range(40):
        for s in sampler.generate(placed, [prompt] * n_rows, sp, seed=seed):
            counts[s.tokens[0]] += 1
    n = counts.sum()
    support = probs > 0
    assert counts[~support].sum() == 0  # nothing outside top-k / top-p
    expected = probs[support] * n
    big = expected >= 5  # pool rare cells for the chi-square approximation
    obs = np.append(counts[support][big], counts[support][~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()  # float32 softmax: make the totals agree exactly
    p = stats.chisquare(obs, exp).pvalue
    assert p > 1e-3, p


def test_same_seed_same_output_and_logps_equal_scoring(tiny):

    cfg, params = tiny
    sp = SamplingParams(max_new_tokens=12, stop_ids=(0,))
    sampler = Sampler(cfg, batch_size=4, min_prompt_bucket=8)
    placed = sampler.place(params)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6], [9], [8, 8]]
    a = sampler.generate(placed, prompts, sp, seed=3)
    b = sampler.generate(placed, prompts, sp, seed=3)
    c = sampler.generate(placed, prompts, sp, seed=4)
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert [s.tokens for s in a] != [s.tokens for s in c]
    # at T=1, no top-k/top-p, the sampler's log-probs are the model's: teacher-forced scoring agrees
    assert sp.logps_are_model_logps
    packed = tokenize.pack(prompts, [s.tokens for s in a], 8, 16)
    ref = np.asarray(whole_row_logps(params, cfg, packed))
    np.testing.assert_allclose([s.logp for s in a], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,layout", [((2, 2, 2), "auto"), ((8, 1, 1), "auto"), ((1, 8, 1), "tensor"),
                                          ((1, 8, 1), "replicated"), ((2, 2, 2), "train")])
def test_greedy_on_8_device_mesh_equals_one_device(shape, layout):
    """In every decode layout (auto: tensor-parallel over 2 devices, the 2 kv heads; the batch over 4)."""
    cfg = tiny_config("qwen2", vocab_size=64, num_heads=4, num_kv_heads=2)
    params = transformer.init_params(cfg, jax.random.key(1))
    params["embed"] = params["embed"] * 30
    prompts = [list(range(1, 2 + i % 7)) for i in range(8)]
    sp = SamplingParams(max_new_tokens=10, greedy=True, stop_ids=(0,))
    one = Sampler(cfg, sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), batch_size=8)
    many = Sampler(cfg, sharding.make_mesh(*shape), batch_size=8, layout=layout)
    assert many.layout == {"auto": "tensor"}.get(layout, layout)
    a = one.generate(one.place(params), prompts, sp)
    b = many.generate(many.place(params), prompts, sp)
    assert [s.tokens for s in a] == [s.tokens for s in b]


def test_few_programs_for_many_prompt_lengths(tiny):
    cfg, params = tiny
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 32, size=rng.integers(1, 200))) for _ in range(200)]
    sampler = Sampler(cfg, batch_size=32)
    sampler.generate(sampler.place(params), prompts, SamplingParams(max_new_tokens=2, greedy=True))
    assert len(sampler.compiled_programs) <= 5  # power-of-two buckets 16..256


def test_two_level_categorical_matches_softmax_over_many_blocks():
    """V = 700 spans 3 blocks of 256 (the last padded); masked tokens leave blocks empty."""
    from scipy import stats

    from spin_jax.sampling import categorical

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=700).astype(np.float32)
    logits[256:512] = jnp.finfo(jnp.float32).min  # a whole empty block
    logits[600:] = jnp.finfo(jnp.float32).min
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    draws = jax.jit(lambda k: categorical(k, jnp.broadcast_to(jnp.asarray(logits), (20000, 700))))(
        jax.random.key(0))
    counts = np.bincount(np.asarray(draws), minlength=700)
    assert counts[probs == 0].sum() == 0
    top = np.argsort(-probs)[:40]  # the 40 likeliest tokens, the rest pooled
    rest = np.setdiff1d(np.nonzero(probs)[0], top)
    obs = np.append(counts[top], counts[rest].sum())
    exp = np.append(probs[top], probs[rest].sum()) * counts.sum()
    assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3


def test_decode_phases_attend_to_growing_windows_with_the_same_result(tiny):
    """Phased decoding (static attention windows growing to the whole cache) changes only speed."""
    from spin_jax.sampling import decode_windows

    assert decode_windows(64, 192, 4) == [96, 128, 160, 192]
    assert decode_windows(64, 192, 1) == [192]
    assert decode_windows(16, 19, 4) == [19]
    for p, c, k in [(16, 100, 3), (32, 33, 8), (8, 520, 16)]:
        ws = decode_windows(p, c, k)
        assert ws[-1] == c and ws == sorted(set(ws)) and ws[0] > p and len(ws) <= k
    cfg, params = tiny
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6], [9], [8, 8]]
    sp = SamplingParams(max_new_tokens=40, stop_ids=(0,))
    out = []
    for phases in (1, 6):
        sampler = Sampler(cfg, batch_size=4, min_prompt_bucket=8, decode_phases=phases)
        out.append(sampler.generate(sampler.place(params), prompts, sp, seed=1))
    assert [s.tokens for s in out[0]] == [s.tokens for s in out[1]]
    assert max(len(s.tokens) for s in out[0]) > 16  # decoding went past the first window
    np.testing.assert_allclose([s.logp for s in out[0]], [s.logp for s in out[1]], rtol=1e-5, atol=1e-5)
