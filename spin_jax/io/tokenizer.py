"""Tokenizers: an HF directory's own, or one rebuilt from a GGUF file's metadata (no torch needed).

Both come back as a `transformers.PreTrainedTokenizerFast` carrying the model's own chat template
(or none: `spin_jax.io.templates` sets one), so `apply_chat_template` is the one chat format for
sampling, training and evaluation.
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
    """The tokenizer of a GGUF file, from its metadata: byte-level BPE ("gpt2": SmolLM2, Llama 3,
    Qwen) or SentencePiece BPE ("llama": Gemma, Llama 2)."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    meta = read_gguf_metadata_only(path)
    kind = meta.get("tokenizer.ggml.model")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    if kind == "gpt2":
        tok = _byte_level_tokenizer(path, meta, tokens)
    elif kind == "llama":
        # a token of spaces only is stored with real spaces; the model's text has U+2581 there
        tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
        tok = _sentencepiece_tokenizer(meta, tokens)
    else:
        raise NotImplementedError(f"{path}: GGUF tokenizer model {kind!r}; byte-level BPE ('gpt2') and "
                                  "SentencePiece BPE ('llama') are supported. Use an HF directory with "
                                  "tokenizer.json instead.")
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == GGUF_TOKEN_TYPE_CONTROL]
    vocab = tok.get_vocab()  # user-defined tokens are matched whole in the text (those of the vocabulary)
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == GGUF_TOKEN_TYPE_USER_DEFINED and t in vocab]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    def name(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None else None

    bos = name("bos_token_id")
    if kind == "llama" and meta.get("tokenizer.ggml.add_bos_token", True) and bos is not None:
        # SentencePiece models put BOS before the text when asked to add special tokens
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    template = meta.get("tokenizer.chat_template")  # None for most base models (`templates.apply`)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=name("eos_token_id"),
        unk_token=name("unknown_token_id"), pad_token=name("padding_token_id") or name("eos_token_id"),
        chat_template=template, clean_up_tokenization_spaces=False)


def _byte_level_tokenizer(path: str, meta: dict, tokens: list):
    """Byte-level BPE with the file's merges and its pre-tokenizer's split."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

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
    return tok


def _sentencepiece_tokenizer(meta: dict, tokens: list):
    """SentencePiece BPE ("llama" GGUF tokenizers: Gemma, Llama 2) from GGUF metadata: byte
    fallback, spaces as U+2581, a prefix space only if the file asks for one. The file lists no
    merges; they are every split of a token into two tokens, ranked by the token's place in the
    vocabulary (earlier first: Gemma's merge order, which its scores do not follow), then by the
    longer left piece."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    rank = {t: i for i, t in enumerate(tokens)}  # a repeated spelling keeps its last place
    merges = []
    for t in sorted(rank, key=rank.get):
        merges += [(t[:cut], t[cut:]) for cut in range(len(t) - 1, 0, -1) if t[:cut] in rank and t[cut:] in rank]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab=rank, merges=merges, fuse_unk=True, byte_fallback=True,
                               unk_token=tokens[int(unk)] if unk is not None else None))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok

