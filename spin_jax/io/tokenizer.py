"""Tokenizers: an HF directory's own, or one rebuilt from a GGUF file's metadata (no torch needed).

Both come back as a `transformers.PreTrainedTokenizerFast` carrying the model's own chat template,
so `apply_chat_template` is the one chat format for sampling, training and evaluation.
"""

from __future__ import annotations

import functools

from spin_jax.io.gguf_io import read_gguf_metadata_only

GGUF_TOKEN_TYPE_CONTROL = 3
GGUF_TOKEN_TYPE_USER_DEFINED = 4


def tokenizer_from_hf_dir(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)  # its chat template may be None (`templates.apply`)


@functools.lru_cache(maxsize=4)
def tokenizer_from_gguf(path: str):
    """Byte-level BPE ("gpt2" GGUF tokenizers: SmolLM2, Llama-3, Qwen2) from GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    meta = read_gguf_metadata_only(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise NotImplementedError(f"{path}: GGUF tokenizer model {kind!r}; only byte-level BPE ('gpt2') "
                                  "is supported. Use an HF directory with tokenizer.json instead.")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "smollm":  # llama.cpp's SMOLLM pre-tokenizer: single digits, then GPT-2's split
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     byte_level])
    elif pre in ("gpt2", "default"):
        tok.pre_tokenizer = byte_level
    elif pre in ("llama-bpe", "llama3", "qwen2"):
        split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        if pre == "qwen2":
            split = split.replace(r"\p{N}{1,3}", r"\p{N}")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    else:
        raise NotImplementedError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported")
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == GGUF_TOKEN_TYPE_CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == GGUF_TOKEN_TYPE_USER_DEFINED]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    def name(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None else None

    template = meta.get("tokenizer.chat_template")  # None for most base models (`templates.apply`)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=name("bos_token_id"), eos_token=name("eos_token_id"),
        unk_token=name("unknown_token_id"), pad_token=name("padding_token_id") or name("eos_token_id"),
        chat_template=template, clean_up_tokenization_spaces=False)
