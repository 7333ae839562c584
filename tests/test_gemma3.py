"""The embedded Gemma 3 270M (a Q4_K_M GGUF: Q4_K, Q5_0, Q6_K and Q8_0 tensors) against
transformers, which reads the same file with its own dequantizer, tokenizer builder and PyTorch
Gemma 3: tokenization, logits on real chat prompts, greedy decoding, and `score`."""

import numpy as np
import pytest

from spin_jax.data import tokenize
from tests.test_sampling import PROMPTS, greedy_identical

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = [  # multilingual, code and whitespace-heavy text, and the turn markers
    "Hello, world!", "  leading spaces and\ttabs\n\n\nnewlines   ",
    "Grüße aus München — ça va? 東京は晴れです。 Привет, мир! مرحبا بالعالم", "नमस्ते दुनिया; 안녕하세요 세계",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "1234567890 3.14159 0xDEADBEEF 1e-9", "emoji 🤖🚀 and <start_of_turn>user\nhi<end_of_turn>",
    "\u00a0non-breaking\u2003em space", "a" * 50, "    indented\n\tcode\r\nwindows", "",
]


@pytest.fixture(scope="module")
def gemma():
    from spin_jax.io.load import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="module")
def gemma_torch(gemma):
    from tests.reference import transformers_from_gguf

    return transformers_from_gguf(gemma.source, "model"), transformers_from_gguf(gemma.source, "tokenizer")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def test_tokenizer_identical_to_transformers(gemma, gemma_torch):
    ref = gemma_torch[1]
    same = sum(gemma.tokenizer(t)["input_ids"] == ref(t)["input_ids"] for t in TEXTS)
    decoded = sum(gemma.tokenizer.decode(ref(t)["input_ids"]) == ref.decode(ref(t)["input_ids"]) for t in TEXTS)
    print(f"tokenization identical on {same}/{len(TEXTS)} texts, decoding on {decoded}/{len(TEXTS)}")
    assert same == decoded == len(TEXTS)


def test_chat_format_is_gemmas(gemma):
    tok = gemma.tokenizer
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tok.eos_token == "<end_of_turn>" and tokenize.end_of_turn_id(tok) == 106


def test_logits_on_chat_prompts_match_transformers(gemma, gemma_torch):
    import jax

    from spin_jax.model import transformer

    ids = [tokenize.prompt_ids(gemma.tokenizer, p) for p in PROMPTS[:4]]
    worst = 0.0
    for row in ids:
        ours, _ = jax.jit(lambda p, t: transformer.forward(p, gemma.cfg, t))(gemma.params, np.asarray([row]))
        with torch.no_grad():
            ref = gemma_torch[0](torch.tensor([row])).logits.numpy()
        worst = max(worst, rel_err(ours, ref))
    print(f"worst relative logit error over 4 chat prompts: {worst:.1e}")
    assert worst <= 1e-4


def test_greedy_matches_transformers_generate(gemma, gemma_torch):
    same = greedy_identical(gemma, gemma_torch[0], tokenize.end_of_turn_id(gemma.tokenizer))
    print(f"greedy, 64 tokens: {same}/20 identical")
    assert same >= 19, f"{same}/20 identical"


def test_score_matches_transformers(gemma, gemma_torch):
    """`score`'s path (scoring.score_rows, vocab in chunks) on the already loaded model."""
    import jax

    from spin_jax import scoring, sharding

    rows = [{"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
            {"prompt": "Write a haiku about the sea.",
             "response": "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time."}]
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    got = list(scoring.score_rows(gemma, rows, batch_size=2, vocab_chunk=32768, mesh=mesh, progress=False))
    model, ref_tok = gemma_torch
    worst = 0.0
    for row, g in zip(rows, got):
        p = tokenize.prompt_ids(gemma.tokenizer, row["prompt"])
        r = ref_tok(row["response"], add_special_tokens=False)["input_ids"] + [106]  # <end_of_turn>
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + r])).logits[0].double(), -1)
        ref = sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(r))
        assert g["n_tokens"] == len(r)
        worst = max(worst, abs(g["logp"] - ref) / abs(ref))
    print(f"score: worst relative error {worst:.1e}")
    assert worst <= 1e-3
