"""LoRA adapters as a small explicit pytree next to a frozen base.

A projection W [in, out] of a layer gets A [in, r] and B [r, out]; the layer computes
    x @ W + scale * (dropout(x) @ A) @ B,   scale = alpha / rank.
A is initialised like PEFT's (Kaiming-uniform, bound 1/sqrt(in)) and B at zero, so a new adapter
leaves the model unchanged: SPIN's main player starts equal to its opponent.

The adapters tree mirrors the stacked layer weights (L layers, our [in..., out...] layouts):
    {"wq": {"a": [L, D, r], "b": [L, r, H, E]}, "wo": {"a": [L, H, E, r], "b": [L, r, D]}, ...}
`attach(base, adapters)` puts it under params["layers"]["lora"], so the one forward
(transformer.py, whose `project` adds the update) runs base + adapters through every path: whole
rows, the shared-prefix layout, the KV cache. Each A is sharded over its input axes and each B
over its output axes, by the same rule table as the weights (`transformer.adapter_axes`); the
rank axis is replicated.

`merge` folds the adapters into the weights (in float64, then the base's dtype);
`to_peft`/`from_peft` convert to and from PEFT's tensors (`base_model.model.<module>.lora_A.weight`
[r, in], `lora_B.weight` [out, r]) so `peft.PeftModel.from_pretrained` loads what `export_peft` writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from spin_jax.model import quant, transformer

log = logging.getLogger(__name__)

# target name -> the layer weight it adapts, and that weight's number of input axes after `layers`
TARGETS = {t: (w, transformer.PROJECTION_INPUTS[w]) for t, w in
           (("q", "wq"), ("k", "wk"), ("v", "wv"), ("o", "wo"), ("gate", "w_gate"), ("up", "w_up"), ("down", "w_down"))}
# the HF module of each target (transformers' Llama/Mistral/Qwen/Gemma names)
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
DEFAULT_TARGETS = tuple(TARGETS)  # every linear layer of the blocks (the QLoRA paper's choice)
QUANTIZED = tuple(transformer.PROJECTION_INPUTS)  # what an int8 / nf4 base quantizes: every projection


def base_config(cfg, section):
    """`cfg` of the model as LoRA's frozen base under the config's `model` section: float weights
    in model.base_dtype (param_dtype for int8 / nf4, whose other weights stay in it), and the
    adapters' scale (alpha / rank) and dropout."""
    lo, kind = section.lora, section.base_dtype or cfg.param_dtype
    return cfg.replace(param_dtype=kind if kind not in quant.KINDS else cfg.param_dtype,
                       lora_scale=lo.alpha / lo.rank, lora_dropout=lo.dropout)


def quantize_base(params: dict, kind) -> dict:
    """`params` (numpy) with the projections of every layer quantized for kind int8 / nf4; other
    kinds leave them as they are."""
    if kind not in quant.KINDS:
        return params
    return {**params, "layers": quant.quantize_tree(params["layers"], QUANTIZED, kind)}


def adapter_shapes(cfg, targets, rank: int) -> dict:
    """The adapters tree as float32 jax.ShapeDtypeStructs (no allocation)."""
    shapes = transformer.param_shapes(cfg)["layers"]
    out = {}
    for target in targets:
        name, n_in = TARGETS[target]
        shape = shapes[name].shape
        out[name] = {"a": jax.ShapeDtypeStruct((shape[0], *shape[1:1 + n_in], rank), jnp.float32),
                     "b": jax.ShapeDtypeStruct((shape[0], rank, *shape[1 + n_in:]), jnp.float32)}
    return out


def init_adapters(cfg, targets, rank: int, rng: jax.Array) -> dict:
    """New adapters (float32 numpy): A Kaiming-uniform as PEFT initialises it, B zero."""
    out = {}
    for i, (name, ab) in enumerate(adapter_shapes(cfg, targets, rank).items()):
        fan_in = math.prod(ab["a"].shape[1:-1])
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)): sqrt(6 / ((1 + 5) * fan_in))
        a = jax.random.uniform(jax.random.fold_in(rng, i), ab["a"].shape, jnp.float32, -bound, bound)
        out[name] = {"a": np.asarray(a), "b": np.zeros(ab["b"].shape, np.float32)}
    return out


def base_shapes(cfg, kind) -> dict:
    """`quantize_base`'s tree as jax.ShapeDtypeStructs: float weights in `cfg.param_dtype`, and for
    kind int8 / nf4 the projections quantized."""
    shapes = transformer.param_shapes(cfg)
    if kind not in quant.KINDS:
        return shapes
    layers = dict(shapes["layers"])
    for name in QUANTIZED:
        layers[name] = {key: jax.ShapeDtypeStruct(shape, quant.ARRAY_DTYPES[key])
                        for key, shape in quant.quantized_shapes(layers[name].shape, kind).items()}
    return {**shapes, "layers": layers}


def attach(base: dict, adapters: dict, dropout_key=None) -> dict:
    """The params tree of base + adapters for the forward (`dropout_key`: a key for LoRA dropout,
    training only; one key per layer is scanned with the weights)."""
    lora = dict(adapters)
    if dropout_key is not None:
        layers = next(iter(adapters.values()))["a"].shape[0]
        lora["dropout_key"] = jax.random.key_data(jax.random.split(dropout_key, layers))
    return {**base, "layers": {**base["layers"], "lora": lora}}


def delta(adapter: dict, scale: float) -> np.ndarray:
    """scale * A @ B in float64, in the weight's layout [L, in..., out...]."""
    a, b = np.asarray(adapter["a"], np.float64), np.asarray(adapter["b"], np.float64)
    n, r = a.shape[0], a.shape[-1]
    d = np.matmul(a.reshape(n, -1, r), b.reshape(n, r, -1)) * scale
    return d.reshape(*a.shape[:-1], *b.shape[2:])


def merge(base: dict, adapters: dict, scale: float, dtype=None) -> dict:
    """Base params with W + scale * A @ B in every adapted weight (in float64, rounded to float32,
    then cast to `dtype`, default each weight's own). Numpy in, numpy out."""
    layers = dict(base["layers"])
    for name, adapter in adapters.items():
        w = np.asarray(layers[name])
        merged = (w.astype(np.float64) + delta(adapter, scale)).astype(np.float32)
        layers[name] = merged.astype(dtype or w.dtype)
    return {**base, "layers": layers}


# ----------------------------------------------------------------------------------------------
# PEFT's format


def to_peft(adapters: dict, cfg) -> dict:
    """PEFT tensor names -> arrays: lora_A.weight [r, in], lora_B.weight [out, r] per layer."""
    by_name = {name: target for target, (name, _) in TARGETS.items()}
    out = {}
    for name, adapter in adapters.items():
        module = HF_MODULES[by_name[name]]
        a, b = np.asarray(adapter["a"], np.float32), np.asarray(adapter["b"], np.float32)
        r = a.shape[-1]
        for i in range(a.shape[0]):
            prefix = f"base_model.model.model.layers.{i}.{module}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    return out


def from_peft(tensors: dict, cfg, targets, rank: int) -> dict:
    """The adapters tree from PEFT tensor names (the inverse of `to_peft`)."""
    shapes = transformer.param_shapes(cfg)["layers"]
    out = {}
    for target in targets:
        name, n_in = TARGETS[target]
        shape = shapes[name].shape
        a, b = [], []
        for i in range(cfg.num_layers):
            prefix = f"base_model.model.model.layers.{i}.{HF_MODULES[target]}"
            try:
                a.append(np.asarray(tensors[f"{prefix}.lora_A.weight"], np.float32).T.reshape(*shape[1:1 + n_in], rank))
                b.append(np.asarray(tensors[f"{prefix}.lora_B.weight"], np.float32).T.reshape(rank, *shape[1 + n_in:]))
            except KeyError as e:
                raise KeyError(f"the adapter has no tensor {e.args[0]!r} (targets {', '.join(targets)})") from None
        out[name] = {"a": np.stack(a), "b": np.stack(b)}
    return out


def peft_config(targets, rank: int, alpha: float, dropout: float, base_model: str) -> dict:
    """PEFT's adapter_config.json for these adapters."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "inference_mode": True, "init_lora_weights": True,
            "target_modules": sorted(HF_MODULES[t].split(".")[-1] for t in targets), "modules_to_save": None}


def export_peft(adapters: dict, cfg, out_dir: str, targets, rank: int, alpha: float, dropout: float,
                base_model: str) -> None:
    """adapter_config.json + adapter_model.safetensors in `out_dir` (created)."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(peft_config(targets, rank, alpha, dropout, base_model), f, indent=2)
    save_file(to_peft(adapters, cfg), os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})


def frozen_base(model, m):
    """A loaded model (`io.load.LoadedModel`) as LoRA's frozen base under the config's model section
    `m`: weights in m.base_dtype (int8/nf4: the seven projections quantized, the rest in
    param_dtype), its config carrying the adapters' scale and dropout. Without LoRA, `model` itself."""
    if not m.lora.rank:
        return model
    mcfg = base_config(model.cfg, m)
    params = jax.tree.map(lambda x: np.asarray(x, jnp.dtype(mcfg.param_dtype)), model.params)
    if m.base_dtype in quant.KINDS:
        log.info(f"QLoRA: quantizing the base's projections to {m.base_dtype} (blocks of 64)")
    return dataclasses.replace(model, cfg=mcfg, params=quantize_base(params, m.base_dtype))
