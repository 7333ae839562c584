"""Tokenizers: an HF directory's own, or one rebuilt from a GGUF file's metadata (no torch needed).

Both come back as a `transformers.PreTrainedTokenizerFast` carrying the model's own chat template
(or none: `spin_jax.io.templates` sets one), so `apply_chat_template` is the one chat format for
sampling, training and evaluation.

Each is kept, pickled, in a cache (`~/.cache/spin_jax/tokenizers`; `SPIN_JAX_TOKENIZER_CACHE=DIR` or
`off`): the next command reads it in a fraction of the time, without importing what AutoTokenizer
imports (transformers' configuration classes and, through them, torch) or rebuilding a GGUF file's
vocabulary (5 s for Gemma 3). An HF directory's entry is keyed by the bytes of its files other than
weights, a GGUF file's by its path, size and modification time; both by the transformers and
tokenizers versions and this module's source.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import pickle
import sys

from spin_jax import rundir
from spin_jax.io.gguf_io import read_gguf_metadata_only

log = logging.getLogger("spin_jax")

GGUF_TOKEN_TYPE_CONTROL = 3
GGUF_TOKEN_TYPE_USER_DEFINED = 4


TOKENIZER_CACHE_ENV = "SPIN_JAX_TOKENIZER_CACHE"
CACHE_ENTRIES = 32  # the most recently used entries kept (each 1-15 MB)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".npy", ".npz", ".onnx")


def tokenizer_from_hf_dir(path: str):
    """AutoTokenizer's tokenizer for an HF directory (its chat template may be None: `templates.apply`)."""
    def build():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)

    tok = _cached(lambda: _dir_key(path), build)
    tok.name_or_path = path  # an entry may have been written for the same files elsewhere
    return tok


@functools.lru_cache(maxsize=4)
def tokenizer_from_gguf(path: str):
    """The tokenizer of a GGUF file, from its metadata: byte-level BPE ("gpt2": SmolLM2, Llama 3,
    Qwen) or SentencePiece BPE ("llama": Gemma, Llama 2)."""
    def key():
        st = os.stat(path)
        return _key("gguf", os.path.realpath(path), st.st_size, st.st_mtime_ns)

    return _cached(key, lambda: _tokenizer_from_gguf_metadata(path))


def tokenizer_cache_dir() -> str | None:
    """The tokenizer cache's folder, or None when $SPIN_JAX_TOKENIZER_CACHE turns it off."""
    setting = os.environ.get(TOKENIZER_CACHE_ENV, "")
    if setting and rundir.cache_off(setting):
        return None
    return setting or rundir.cache_home("tokenizers")


@functools.lru_cache(maxsize=1)
def _code_and_versions() -> tuple:
    import importlib.metadata

    with open(__file__, "rb") as f:
        source = hashlib.sha256(f.read()).hexdigest()
    return (source, importlib.metadata.version("transformers"), importlib.metadata.version("tokenizers"),
            sys.version_info[:2])


def _key(*parts) -> str:
    return hashlib.sha256(repr((_code_and_versions(), parts)).encode()).hexdigest()[:32]


def _dir_key(path: str) -> str:
    """The key of an HF directory: the names and bytes of every file in it but weights and hidden ones."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.endswith(WEIGHT_SUFFIXES):
                continue
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode() + b"\0" + rundir.file_sha256(full).encode())
    return _key("dir", digest.hexdigest())


def _cached(key, build):
    """`build()`'s tokenizer, read from the cache when an entry has `key()`, else built and kept. A
    cache that cannot be read or written only costs the build (a warning if it cannot be written)."""
    folder = tokenizer_cache_dir()
    if folder is None:
        return build()
    entry = os.path.join(folder, key() + ".pkl")
    try:
        with open(entry, "rb") as f:
            tok = pickle.load(f)
    except FileNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001 - a damaged entry (a different transformers' classes, a cut file) is rebuilt
        log.debug(f"tokenizer cache: {entry} unreadable ({type(e).__name__}: {e}); rebuilding it")
    else:
        with contextlib.suppress(OSError):  # a read-only cache is still read
            os.utime(entry)  # recently used: kept by _prune
        return tok
    tok = build()
    try:
        data = pickle.dumps(tok)
    except Exception as e:  # noqa: BLE001 - e.g. a custom tokenizer class that does not pickle: not kept
        log.debug(f"tokenizer cache: {type(tok).__name__} does not pickle ({e}); not kept")
        return tok
    try:
        os.makedirs(folder, exist_ok=True)
        rundir.atomic_write(entry, data)
        _prune(folder)
    except OSError as e:
        log.warning(f"tokenizer cache: could not write {entry} ({e.strerror or e}); the tokenizer is rebuilt "
                    f"each time. Set {TOKENIZER_CACHE_ENV} to a writable folder, or to off.")
    return tok


def _prune(folder: str) -> None:
    """Remove all but the CACHE_ENTRIES most recently used entries (another process may remove some too)."""
    used = {}
    for name in os.listdir(folder):
        if name.endswith(".pkl"):
            try:
                used[name] = os.stat(os.path.join(folder, name)).st_mtime
            except FileNotFoundError:
                pass
    for name in sorted(used, key=used.get)[:-CACHE_ENTRIES]:
        try:
            os.remove(os.path.join(folder, name))
        except FileNotFoundError:
            pass


def _tokenizer_from_gguf_metadata(path: str):
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

