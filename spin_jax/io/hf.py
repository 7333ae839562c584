"""HF safetensors directories in and out (Llama, Mistral, Qwen2 architectures).

HF stores torch Linear weights as [out, in]; our params use [in, ...out] layouts (see
`spin_jax.model.llama`). The RoPE layout is the same (half rotation), so no permutation.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from spin_jax.model.config import ModelConfig

_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def read_hf_dir(path: str):
    """(ModelConfig, params pytree of numpy arrays) from `config.json` + safetensors in `path`."""
    cfg = config_from_hf(_read_json(os.path.join(path, "config.json")), path)
    tensors = _read_safetensors(path)
    return cfg, _params_from_hf(cfg, tensors, path)


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    arch = hf.get("model_type")
    if arch not in _HF_CLASSES:
        raise ValueError(f"{where}: model_type {arch!r} is not supported; expected one of {list(_HF_CLASSES)}")
    rope = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or rope
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"} if scaling else None
    if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    heads = hf["num_attention_heads"]
    window = hf.get("sliding_window") if arch == "mistral" or hf.get("use_sliding_window") else None
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
        sliding_window=window, architecture=arch)


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
    if cfg.architecture == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None)
    if tokenizer is not None:
        hf.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    return hf


def export_hf_dir(params, cfg: ModelConfig, out_dir: str, tokenizer=None, dtype: str = "float32",
                  extra_files: Optional[dict] = None) -> str:
    """Write `config.json`, `model.safetensors`, `generation_config.json` and the tokenizer files."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    np_dtype = _np_dtype(dtype)
    tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32).astype(np_dtype))
               for k, v in params_to_hf(params, cfg).items()}
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
    d = cfg.hidden_size
    lp = {k: np.asarray(v, dtype=np.float32) for k, v in params["layers"].items()}
    out = {"model.embed_tokens.weight": np.asarray(params["embed"], np.float32),
           "model.norm.weight": np.asarray(params["final_norm"], np.float32)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"], np.float32).T
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = lp["attn_norm"][i]
        out[p + "post_attention_layernorm.weight"] = lp["mlp_norm"][i]
        out[p + "self_attn.q_proj.weight"] = lp["wq"][i].reshape(d, -1).T
        out[p + "self_attn.k_proj.weight"] = lp["wk"][i].reshape(d, -1).T
        out[p + "self_attn.v_proj.weight"] = lp["wv"][i].reshape(d, -1).T
        out[p + "self_attn.o_proj.weight"] = lp["wo"][i].reshape(-1, d).T
        out[p + "mlp.gate_proj.weight"] = lp["w_gate"][i].T
        out[p + "mlp.up_proj.weight"] = lp["w_up"][i].T
        out[p + "mlp.down_proj.weight"] = lp["w_down"][i].T
        if cfg.attention_bias:
            for n in ("q", "k", "v"):
                out[p + f"self_attn.{n}_proj.bias"] = lp[f"b{n}"][i].reshape(-1)
    return out


def _params_from_hf(cfg: ModelConfig, t: dict, path: str):
    h, k, e, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size

    def get(name):
        if name not in t:
            raise KeyError(f"{path}: tensor {name!r} missing from the safetensors files")
        return np.asarray(t[name], dtype=np.float32)

    layers = {key: [] for key in ("attn_norm", "mlp_norm", "wq", "wk", "wv", "wo",
                                  "w_gate", "w_up", "w_down")}
    if cfg.attention_bias:
        layers.update(bq=[], bk=[], bv=[])
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layers["attn_norm"].append(get(p + "input_layernorm.weight"))
        layers["mlp_norm"].append(get(p + "post_attention_layernorm.weight"))
        layers["wq"].append(get(p + "self_attn.q_proj.weight").T.reshape(d, h, e))
        layers["wk"].append(get(p + "self_attn.k_proj.weight").T.reshape(d, k, e))
        layers["wv"].append(get(p + "self_attn.v_proj.weight").T.reshape(d, k, e))
        layers["wo"].append(get(p + "self_attn.o_proj.weight").T.reshape(h, e, d))
        layers["w_gate"].append(get(p + "mlp.gate_proj.weight").T)
        layers["w_up"].append(get(p + "mlp.up_proj.weight").T)
        layers["w_down"].append(get(p + "mlp.down_proj.weight").T)
        if cfg.attention_bias:
            layers["bq"].append(get(p + "self_attn.q_proj.bias").reshape(h, e))
            layers["bk"].append(get(p + "self_attn.k_proj.bias").reshape(k, e))
            layers["bv"].append(get(p + "self_attn.v_proj.bias").reshape(k, e))
    params = {"embed": get("model.embed_tokens.weight"),
              "layers": {key: np.stack(v) for key, v in layers.items()},
              "final_norm": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        params["lm_head"] = get("lm_head.weight").T
    return params


def _read_safetensors(path: str) -> dict:
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                "(download the model with its safetensors weights)")
    tensors = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="flax") as f:
            for key in f.keys():
                tensors[key] = np.asarray(f.get_tensor(key))
    return tensors


def _np_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: an HF model directory needs config.json") from None


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
