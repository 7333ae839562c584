"""HF safetensors directories in and out (Llama, Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3 text).

Tensor names and layouts come from `spin_jax.io.names`. The RoPE layout is the same as ours (half
rotation), so no permutation.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from spin_jax import rundir
from spin_jax.errors import NonFiniteParams
from spin_jax.io import names
from spin_jax.model.config import GEMMA, ModelConfig, gemma_local_layers

_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
# HF model_type -> our architecture (Gemma 3's text-only model is "gemma3_text")
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
                "gemma3_text": "gemma3"}


def read_hf_dir(path: str):
    """(ModelConfig, params pytree of numpy arrays) from `config.json` + safetensors in `path`."""
    config_path = os.path.join(path, "config.json")
    cfg = config_from_hf(read_json_object(config_path), config_path)
    tensors = _read_safetensors(path)
    return cfg, _params_from_hf(cfg, tensors, path)


def read_json_object(path: str) -> dict:
    """A JSON file holding an object (a model's config.json); anything else is an error naming it."""
    obj = _read_json(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object of model settings, got a {type(obj).__name__}")
    return obj


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig of a transformers config.json; a missing or bad value is an error naming `where`."""
    try:
        return _config_from_hf(hf, where)
    except KeyError as e:
        raise ValueError(f"{where}: missing key {e.args[0]!r}; is this a transformers model directory?") from None
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def _config_from_hf(hf: dict, where: str) -> ModelConfig:
    arch = _MODEL_TYPES.get(hf.get("model_type"))
    if arch is None:
        raise ValueError(f"{where}: model_type {hf.get('model_type')!r} is not supported; expected one of "
                         f"{list(_MODEL_TYPES)}")
    rope = hf.get("rope_parameters") or {}
    if "full_attention" in rope:  # Gemma 3 in transformers 5: one RoPE per layer kind
        rope, local_rope = rope["full_attention"], rope.get("sliding_attention") or {}
    else:
        local_rope = {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or rope
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"} if scaling else None
    if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    heads = hf["num_attention_heads"]
    gemma = arch in GEMMA
    window = hf.get("sliding_window") if arch == "mistral" or gemma or hf.get("use_sliding_window") else None
    extra = {}
    if gemma:
        types = hf.get("layer_types")
        local = (tuple(t == "sliding_attention" for t in types) if types else
                 gemma_local_layers(arch, hf["num_hidden_layers"], hf.get("sliding_window_pattern")))
        extra = dict(
            local_layers=local,
            activation=_activation(hf.get("hidden_activation") or hf.get("hidden_act"), where),
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
            attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"))
        if arch == "gemma3":
            extra["rope_local_theta"] = float(hf.get("rope_local_base_freq", local_rope.get("rope_theta", 10000.0)))
            theta = hf.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        attention_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
        sliding_window=window, architecture=arch, **extra)


def _int_if_whole(x):
    return int(x) if x is not None and float(x).is_integer() else x


def _activation(name, where: str) -> str:
    acts = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "silu": "silu"}
    if name not in acts:
        raise ValueError(f"{where}: hidden_activation {name!r} is not supported; expected one of {list(acts)}")
    return acts[name]


def config_to_hf(cfg: ModelConfig, tokenizer=None, dtype: str = "float32") -> dict:
    hf = {
        "architectures": [_HF_CLASSES[cfg.architecture]], "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling_dict, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "torch_dtype": dtype,
        "dtype": dtype,
    }
    if cfg.architecture == "llama":
        hf.update(attention_bias=cfg.attention_bias, mlp_bias=False)
    if cfg.architecture == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if cfg.architecture in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=False, sliding_window=None)
    if cfg.architecture == "qwen3":
        hf.update(attention_bias=cfg.attention_bias)
    if cfg.architecture in ("gemma2", "gemma3"):
        types = ["sliding_attention" if w is not None else "full_attention" for w in cfg.layer_windows()]
        hf.update(model_type="gemma3_text" if cfg.architecture == "gemma3" else "gemma2",
                  hidden_activation="gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else "silu",
                  sliding_window=cfg.sliding_window, layer_types=types,
                  query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar),
                  attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
                  attention_bias=cfg.attention_bias)
        hf.pop("hidden_act")
        if cfg.architecture == "gemma3":
            full = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling_dict or {})}
            local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
            hf.update(rope_parameters={"full_attention": full, "sliding_attention": local})
            del hf["rope_theta"], hf["rope_scaling"]
    if tokenizer is not None:
        hf.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    return hf


def export_hf_dir(params, cfg: ModelConfig, out_dir: str, tokenizer=None, dtype: str = "float32",
                  extra_files: Optional[dict] = None) -> str:
    """Write `config.json`, `model.safetensors`, `generation_config.json` and the tokenizer files."""
    from safetensors.numpy import save_file

    torch_layout = params_to_hf(params, cfg)
    bad = [k for k, v in torch_layout.items() if not np.all(np.isfinite(v))]
    if bad:
        raise NonFiniteParams(f"the parameters hold NaN or Inf in {len(bad)} tensor(s) ({', '.join(bad[:3])}); "
                              f"nothing was written to {out_dir}. Lower train.learning_rate or set "
                              "train.max_grad_norm, delete the iteration's checkpoints and rerun")
    np_dtype = _np_dtype(dtype)
    tensors = {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in torch_layout.items()}
    rundir.check_free_space(out_dir, sum(t.nbytes for t in tensors.values()), "the model's weights")
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(out_dir, "config.json"), config_to_hf(cfg, tokenizer, dtype))
    gen = {"do_sample": True, "temperature": 1.0, "top_p": 1.0}
    if tokenizer is not None:
        gen.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
        tokenizer.save_pretrained(out_dir)
    _write_json(os.path.join(out_dir, "generation_config.json"), gen)
    for name, text in (extra_files or {}).items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text)
    return out_dir


def params_to_hf(params, cfg: ModelConfig) -> dict:
    """Our params pytree -> {HF tensor name: [out, in] numpy array}."""
    return names.params_to_torch(params, cfg, "hf")


def _params_from_hf(cfg: ModelConfig, t: dict, path: str):
    def get(name, key):
        if name not in t:
            raise KeyError(f"{path}: tensor {name!r} missing from the safetensors files")
        return t[name]

    return names.params_from_torch(cfg, get, "hf")


def _read_safetensors(path: str) -> dict:
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        parsed = _read_json(index)
        weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
        root = os.path.realpath(path)
        for name in files:  # the index names files of this directory, nothing outside it
            if not isinstance(name, str) or not os.path.realpath(os.path.join(path, name)).startswith(root + os.sep):
                raise ValueError(f"{index}: weight_map names {name!r}, outside the model directory; refused")
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                "(download the model with its safetensors weights)")
    tensors = {}
    for name in files:
        file = os.path.join(path, name)
        try:
            with safe_open(file, framework="numpy") as f:  # bfloat16 too (ml_dtypes); no device round trip
                for key in f.keys():
                    tensors[key] = np.asarray(f.get_tensor(key))
        except FileNotFoundError:
            raise FileNotFoundError(f"{file}: not found (named by the model directory's index)") from None
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise ValueError(f"{file}: not a readable safetensors file ({(str(e).splitlines() or [''])[0]}); "
                             "download it again") from None
    return tensors


def _np_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: an HF model directory needs config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
