"""The Flax model against transformers' PyTorch models (logits, export round trip, the real SmolLM2)
and the attention backward against torch in float64."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spin_jax.io import hf
from spin_jax.model import attention, transformer
from spin_jax.model.config import tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def torch_tiny(arch, seed=0):
    """A random transformers model built by transformers itself (our code not involved)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager")
    if arch == "llama":
        c = transformers.LlamaConfig(**common, rope_theta=10000.0,
                                     rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 16})
        m = transformers.LlamaForCausalLM(c)
    elif arch == "llama_tied":
        c = transformers.LlamaConfig(**{**common, "tie_word_embeddings": True}, rope_theta=500.0)
        m = transformers.LlamaForCausalLM(c)
    elif arch == "mistral":
        c = transformers.MistralConfig(**common, sliding_window=4, rope_theta=10000.0)
        m = transformers.MistralForCausalLM(c)
    elif arch == "qwen2":
        c = transformers.Qwen2Config(**common, rope_theta=1000000.0, use_sliding_window=False)
        m = transformers.Qwen2ForCausalLM(c)
    elif arch == "qwen3":
        c = transformers.Qwen3Config(**{**common, "tie_word_embeddings": True}, rope_theta=1000000.0,
                                     use_sliding_window=False)
        m = transformers.Qwen3ForCausalLM(c)
    elif arch in ("gemma2", "gemma3"):
        # 3 layers: local (window 4), global, local; scores scaled by 24 ** -0.5, not head_dim's
        gemma = dict(common, num_hidden_layers=3, tie_word_embeddings=True, sliding_window=4,
                     layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                     query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh")
        if arch == "gemma2":  # small caps, so that capping bends the scores and logits of a random model
            c = transformers.Gemma2Config(**gemma, rope_theta=10000.0, attn_logit_softcapping=1.5,
                                          final_logit_softcapping=2.0)
            m = transformers.Gemma2ForCausalLM(c)
        else:
            c = transformers.Gemma3TextConfig(**gemma, rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
            m = transformers.Gemma3ForCausalLM(c)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # non-trivial norm weights and biases so they are tested too
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    return m.eval()


def torch_logits(m, tokens):
    with torch.no_grad():
        return m(torch.tensor(np.asarray(tokens))).logits.numpy()


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_logits_match_transformers_tiny(arch, tmp_path):
    m = torch_tiny(arch)
    m.save_pretrained(tmp_path)
    cfg, params = hf.read_hf_dir(str(tmp_path))
    if arch in ("mistral", "gemma2", "gemma3"):
        assert cfg.sliding_window == 4
    if arch.startswith("gemma"):
        assert cfg.local_layers == (True, False, True) and cfg.mixed_layers
    tokens = np.random.default_rng(0).integers(0, 128, size=(2, 12))  # 12 > window 4
    ref = torch_logits(m, tokens)
    for block in (0, 5):  # whole attention; query blocks of 5, 5 and 2 against the keys they can see
        ours, _ = jax.jit(lambda p, t: transformer.forward(p, cfg.replace(attn_block=block), t))(params, tokens)
        assert rel_err(ours, ref) <= 1e-4


def test_a_bfloat16_checkpoint_reads_as_its_values_in_float32(tmp_path):
    """Most Hub checkpoints are stored in bfloat16: read as float32, they give the logits of
    transformers' model upcast from the same bfloat16 weights."""
    m = torch_tiny("qwen2").to(torch.bfloat16)
    m.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    cfg, params = hf.read_hf_dir(str(tmp_path))
    assert {np.asarray(x).dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    tokens = np.random.default_rng(2).integers(0, 128, size=(2, 9))
    ours, _ = transformer.forward(params, cfg, tokens)
    assert rel_err(ours, torch_logits(m.float(), tokens)) <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_export_round_trip(arch, tmp_path):
    cfg = tiny_config(arch, **({"tie_embeddings": True} if arch == "llama" else {}))
    params = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(1)))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 10))
    ours, _ = transformer.forward(params, cfg, tokens)
    hf.export_hf_dir(params, cfg, str(tmp_path / "out"))
    m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert rel_err(ours, torch_logits(m.eval(), tokens)) <= 1e-4
    cfg2, params2 = hf.read_hf_dir(str(tmp_path / "out"))
    assert cfg2 == cfg
    back, _ = transformer.forward(params2, cfg2, tokens)
    assert rel_err(back, ours) <= 1e-6


def test_smollm2_logits_match_transformers_gguf(smollm2, smollm2_torch, smollm2_torch_tokenizer):
    """The real 135M model, loaded from the same GGUF by both sides (each its own dequantizer)."""
    text = ["The capital of France is Paris, and the capital of Germany is",
            "def fibonacci(n):\n    if n < 2:\n        return n\n"]
    ids = [smollm2_torch_tokenizer(t)["input_ids"][:12] for t in text]
    tokens = np.array(ids)
    ours, _ = jax.jit(lambda p, t: transformer.forward(p, smollm2.cfg, t))(smollm2.params, tokens)
    assert rel_err(ours, torch_logits(smollm2_torch, tokens)) <= 1e-4


def test_the_kept_transformers_reference_is_what_transformers_read(smollm2, tmp_path, monkeypatch):
    """The reference cache (tests.reference.transformers_from_gguf) gives back what transformers built
    from the GGUF file: every weight bit for bit, the config, tokenization of special tokens and
    digits, and the chat template."""
    from tests.reference import transformers_from_gguf

    monkeypatch.setenv("SPIN_JAX_REFERENCE_CACHE", str(tmp_path))
    fresh = {part: transformers_from_gguf(smollm2.source, part) for part in ("model", "tokenizer")}
    assert sorted(p.name for p in tmp_path.glob("*/*")) == ["model", "tokenizer"]  # both kept
    kept = {part: transformers_from_gguf(smollm2.source, part) for part in ("model", "tokenizer")}
    a, b = fresh["model"].state_dict(), kept["model"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = [{k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"}
              for m in (fresh["model"], kept["model"])]
    assert config[0] == config[1]
    texts = ["Hello, world! 1234567890", "<|im_start|>user\nünïcödé ✓\t  spaces<|im_end|>", ""]
    for t in texts:
        assert fresh["tokenizer"](t)["input_ids"] == kept["tokenizer"](t)["input_ids"], t
    msgs = [{"role": "user", "content": "Hi"}]
    assert (fresh["tokenizer"].apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            == kept["tokenizer"].apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))


@pytest.mark.parametrize("cap", [None, 2.0])
def test_attention_backward_matches_torch_float64(cap):
    """The hand-written attention backward against torch autograd of plain softmax attention in
    float64, on a mask with a prompt, causal responses and left-padding rows that see no valid key
    (defined to output 0; their output gradient is nonzero here, so that case is checked too);
    with Gemma 2's score soft-capping too (a cap of 2 bends every score)."""
    rng = np.random.default_rng(0)
    b, t, h, kh, e, p = 2, 5, 4, 2, 8, 2
    s = p + t
    q, kt, v, d_out = (rng.standard_normal(shape).astype(np.float32) for shape in
                       ((b, t, h, e), (b, kh, e, s), (b, kh, s, e), (b, t, h, e)))
    k_valid = np.ones((b, s), bool)
    k_valid[1, :4] = False  # batch row 1: queries 0 and 1 (slots 2, 3) see no valid key
    mask = (np.arange(s)[None, None, :] <= (p + np.arange(t))[None, :, None]) & k_valid[:, None, :]
    assert not mask[1, :2].any() and mask[1, 2:].any(-1).all()

    # whole, and in query blocks of 2, 2 and 1 that each see keys up to their last query's slot
    ours = [jax.vjp(lambda q, kt, v: attention.causal_attention(q, kt, v, jnp.asarray(mask), p, block, cap), q, kt, v)
            for block in (0, 2)]

    tq, tk, tv = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, kt, v))
    qg = tq.reshape(b, t, kh, h // kh, e).permute(0, 2, 3, 1, 4)  # [B, K, G, T, E]
    scores = torch.einsum("bkgte,bkes->bkgts", qg, tk) / np.sqrt(e)
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    scores = scores.masked_fill(~torch.tensor(mask)[:, None, None], -1e300)
    o = torch.einsum("bkgts,bkse->bkgte", torch.softmax(scores, -1), tv)
    t_out = o.permute(0, 3, 1, 2, 4).reshape(b, t, h, e) * torch.tensor(mask.any(-1))[:, :, None, None]
    t_out.backward(torch.tensor(d_out, dtype=torch.float64))
    for out, vjp in ours:
        assert rel_err(out, t_out.detach().numpy()) <= 1e-5
        for got, ref in zip(vjp(jnp.asarray(d_out)), (tq.grad, tk.grad, tv.grad)):
            assert rel_err(got, ref.numpy()) <= 1e-5


def test_gguf_reader_matches_the_gguf_package(smollm2):
    """spin_jax's GGUF parser (one array read per metadata array, tensors memory-mapped) against the
    `gguf` package's GGUFReader on the real SmolLM2 file: every metadata value, and every tensor's
    type, shape and bytes."""
    import gguf

    from spin_jax.io import gguf_io

    ours, ref = gguf_io.open_gguf(smollm2.source), gguf.GGUFReader(smollm2.source)
    ref_meta = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == ref_meta
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        o = ours.tensors[t.name]
        assert (o.tensor_type, o.shape) == (t.tensor_type, tuple(int(d) for d in t.shape)), t.name
        assert np.asarray(o.data).tobytes() == np.asarray(t.data).tobytes(), t.name
