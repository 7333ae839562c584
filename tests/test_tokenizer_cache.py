"""The tokenizer cache (spin_jax.io.tokenizer): a kept tokenizer is the one AutoTokenizer (or the GGUF
builder) gives for the same files, an entry follows the files it was built from, and a cache that
is damaged, unwritable or off costs only the build."""

import json
import logging
import os
import shutil

import pytest
from transformers import AutoTokenizer

from spin_jax.io import tokenizer as tokenizer_lib
from spin_jax.io.load import resolve_model_path

TEXTS = ["Hello world", "  leading spaces and\ttabs\n\nnewlines  ", "digits 1234567 and 3.14159",
         "ünïcödé — 日本語のテキスト 🙂", "def f(x):\n    return x ** 2\n", "<|im_start|>user\nHi<|im_end|>",
         "<|endoftext|> special in the middle <|im_end|> of text", ""]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 * 7?"},
        {"role": "assistant", "content": "84."}, {"role": "user", "content": "And 13 * 7?"}]


def assert_same_tokenizer(got, want):
    assert type(got) is type(want)
    assert len(got) == len(want) and got.get_vocab() == want.get_vocab()
    assert got.all_special_tokens == want.all_special_tokens
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id",
                 "pad_token_id", "padding_side", "truncation_side", "model_max_length", "chat_template"):
        assert getattr(got, name) == getattr(want, name), name
    assert {i: str(t) for i, t in got.added_tokens_decoder.items()} == \
        {i: str(t) for i, t in want.added_tokens_decoder.items()}
    for text in TEXTS:
        for special in (True, False):
            ids = want(text, add_special_tokens=special)["input_ids"]
            assert got(text, add_special_tokens=special)["input_ids"] == ids, (text, special)
            assert got.decode(ids) == want.decode(ids)
            assert got.decode(ids, skip_special_tokens=True) == want.decode(ids, skip_special_tokens=True)
    batch = dict(padding=True, return_attention_mask=True)
    assert got(TEXTS, **batch) == want(TEXTS, **batch)
    if want.chat_template:
        for prompt in (True, False):
            assert got.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt) == \
                want.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "tokenizers"
    monkeypatch.setenv(tokenizer_lib.TOKENIZER_CACHE_ENV, str(path))
    return path


@pytest.fixture
def qwen2_dir(tiny_model_dir, tmp_path):
    """The tiny model's files with a qwen2 config: AutoTokenizer picks its class by the model type."""
    d = tmp_path / "qwen2"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    return str(d)


def no_autotokenizer(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("AutoTokenizer was called: the kept tokenizer was not read")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_a_kept_hf_tokenizer_is_the_one_autotokenizer_gives(which, tiny_model_dir, qwen2_dir, cache, monkeypatch):
    path = tiny_model_dir if which == "llama" else qwen2_dir
    built = tokenizer_lib.tokenizer_from_hf_dir(path)
    assert len(os.listdir(cache)) == 1
    with monkeypatch.context() as m:
        no_autotokenizer(m)
        kept = tokenizer_lib.tokenizer_from_hf_dir(path)
    assert kept is not built and kept.name_or_path == path
    want = AutoTokenizer.from_pretrained(path)
    if which == "qwen2":
        assert type(want).__name__ == "Qwen2Tokenizer"  # the model type's class, not the file's
    assert_same_tokenizer(built, want)
    assert_same_tokenizer(kept, want)


def test_an_entry_follows_the_files_it_was_built_from(tiny_model_dir, tmp_path, cache, monkeypatch):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    first = tokenizer_lib.tokenizer_from_hf_dir(str(d))
    # the weights are not the tokenizer's: a new model.safetensors reads the kept one
    (d / "model.safetensors").write_bytes(b"other weights")
    with monkeypatch.context() as m:
        no_autotokenizer(m)
        tokenizer_lib.tokenizer_from_hf_dir(str(d))
    # a changed tokenizer file is a new entry, built by AutoTokenizer
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (d / "chat_template.jinja").write_text(template)
    changed = tokenizer_lib.tokenizer_from_hf_dir(str(d))
    assert changed.chat_template == template != first.chat_template
    assert len(os.listdir(cache)) == 2
    assert_same_tokenizer(tokenizer_lib.tokenizer_from_hf_dir(str(d)), AutoTokenizer.from_pretrained(str(d)))


def test_a_damaged_unwritable_or_switched_off_cache_costs_only_the_build(tiny_model_dir, tmp_path, cache,
                                                                        monkeypatch, caplog):
    want = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer_lib.tokenizer_from_hf_dir(tiny_model_dir)
    (entry,) = cache.iterdir()
    entry.write_bytes(entry.read_bytes()[:1000])  # cut short
    assert_same_tokenizer(tokenizer_lib.tokenizer_from_hf_dir(tiny_model_dir), want)
    with monkeypatch.context() as m:  # and written again whole
        no_autotokenizer(m)
        tokenizer_lib.tokenizer_from_hf_dir(tiny_model_dir)

    blocked = tmp_path / "a_file"
    blocked.write_text("")
    monkeypatch.setenv(tokenizer_lib.TOKENIZER_CACHE_ENV, str(blocked / "tokenizers"))
    with caplog.at_level(logging.WARNING, logger="spin_jax"):
        assert_same_tokenizer(tokenizer_lib.tokenizer_from_hf_dir(tiny_model_dir), want)
    assert "tokenizer cache: could not write" in caplog.text and tokenizer_lib.TOKENIZER_CACHE_ENV in caplog.text

    monkeypatch.setenv(tokenizer_lib.TOKENIZER_CACHE_ENV, "off")
    monkeypatch.setattr(tokenizer_lib.pickle, "load", lambda f: pytest.fail("read a kept tokenizer"))
    monkeypatch.setattr(tokenizer_lib.rundir, "atomic_write", lambda *a: pytest.fail("kept a tokenizer"))
    assert_same_tokenizer(tokenizer_lib.tokenizer_from_hf_dir(tiny_model_dir), want)


def test_the_cache_keeps_its_most_recently_used_entries(tiny_model_dir, cache):
    cache.mkdir()
    for k in range(tokenizer_lib.CACHE_ENTRIES + 5):
        old = cache / f"old{k:02d}.pkl"
        old.write_bytes(b"")
        os.utime(old, (1_000_000 + k, 1_000_000 + k))
    tokenizer_lib.tokenizer_from_hf_dir(tiny_model_dir)
    kept = sorted(os.listdir(cache))
    assert len(kept) == tokenizer_lib.CACHE_ENTRIES
    assert "old00.pkl" not in kept and "old36.pkl" in kept  # the oldest went, the new entry stayed
    assert len([n for n in kept if not n.startswith("old")]) == 1


def test_a_kept_gguf_tokenizer_is_the_one_its_metadata_builds(cache, tmp_path, monkeypatch):
    path = str(tmp_path / "smollm2.gguf")  # a copy: its modification time is changed below
    shutil.copy(resolve_model_path("smollm2-135m-instruct"), path)
    built = tokenizer_lib.tokenizer_from_gguf.__wrapped__(path)
    with monkeypatch.context() as m:
        m.setattr(tokenizer_lib, "_tokenizer_from_gguf_metadata", lambda p: pytest.fail("rebuilt"))
        kept = tokenizer_lib.tokenizer_from_gguf.__wrapped__(path)
    assert_same_tokenizer(kept, tokenizer_lib._tokenizer_from_gguf_metadata(path))
    assert_same_tokenizer(built, kept)
    os.utime(path)  # a file changed in place (its modification time) is read again
    with monkeypatch.context() as m:
        m.setattr(tokenizer_lib, "_tokenizer_from_gguf_metadata", lambda p: "rebuilt")
        assert tokenizer_lib.tokenizer_from_gguf.__wrapped__(path) == "rebuilt"
