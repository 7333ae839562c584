"""Chat templates for models that ship none: the known families' turn formats, a Jinja file, and the
errors (no template at all, a template whose end-of-turn token the model lacks)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from spin_jax.io import templates
from spin_jax.io.load import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gemma_like():
    """SmolLM2's tokenizer with Gemma's turn tokens added (a stand-in with those tokens)."""
    tok = load_tokenizer("smollm2-135m-instruct")
    tok = templates.copy.deepcopy(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return tok


def test_gemma_turn_format_trims_and_folds_the_system_message(gemma_like):
    tok = templates.apply(gemma_like, "gemma", "model.chat_template", "test")
    chat = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "  Hello there \n"},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Bye"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == (f"{tok.bos_token}<start_of_turn>user\nBe brief.\n\nHello there<end_of_turn>\n"
                    "<start_of_turn>model\nHi.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n"
                    "<start_of_turn>model\n")
    assert tok.eos_token == "<end_of_turn>"  # responses end, and sampling stops, on the end of a turn
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True, add_generation_prompt=True,
                                  return_dict=False)
    assert ids[0] == tok.bos_token_id and tok.convert_tokens_to_ids("<start_of_turn>") in ids


def test_chatml_and_a_jinja_file(tmp_path):
    tok = templates.apply(load_tokenizer("smollm2-135m-instruct"), "chatml", "model.chat_template", "test")
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" and tok.eos_token == "<|im_end|>"
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>{% endfor %}")
    tok = templates.apply(tok, str(path), "model.chat_template", "test")
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == "[user] Hi<|im_end|>"


def test_template_whose_end_token_the_model_lacks_is_an_error():
    with pytest.raises(ValueError, match="--chat-template 'gemma' ends turns with <end_of_turn>"):
        templates.apply(load_tokenizer("smollm2-135m-instruct"), "gemma", "--chat-template", "smollm2")


def test_model_without_a_template_needs_the_option(tiny_model_dir, tmp_path):
    """A model that ships no chat template: score names --chat-template and exits 1; with it set,
    the same command works."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    for name in ("chat_template.jinja", "chat_template.json"):
        if (model / name).exists():
            (model / name).unlink()
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "spin_jax", "score", "--model", str(model), "--input", str(rows)]
    p = subprocess.run(cmd + ["--output", str(tmp_path / "a.jsonl")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "ships no chat template; set --chat-template" in p.stderr, p.stderr
    p = subprocess.run(cmd + ["--output", str(tmp_path / "b.jsonl"), "--chat-template", "chatml"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "logp" in json.loads((tmp_path / "b.jsonl").read_text().splitlines()[0])
