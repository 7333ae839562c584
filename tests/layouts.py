"""Compiled programs on this machine's 8 CPU devices and what they move between devices (helpers
for tests/test_layouts.py and tests/test_plan.py)."""

import functools
import json
import math
import os

import jax

from spin_jax import collectives, plan, sharding
from spin_jax.config import load_config
from spin_jax.model import lora, transformer
from spin_jax.model.config import ModelConfig, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 16 pairs of a 64-token prompt and two 64-token responses: 3072 tokens side by side, 2048 response tokens
PAIRS, PROMPT, RESPONSE = 16, 64, 64
# SFT: 16 rows of 128 tokens
OVERRIDES = [f"train.global_batch_size={PAIRS}", "data.max_prompt_length=64", "data.max_length=128",
             "sampling.batch_size=16", "sampling.max_new_tokens=8", "model.remat=full", "sft.global_batch_size=16"]


def model() -> ModelConfig:
    """A small Llama whose dimensions are none of the token counts (so a collective's shape tells
    activations of the whole batch apart from weights)."""
    return tiny_config("llama", vocab_size=1000, hidden_size=192, intermediate_size=320, num_layers=2, num_heads=8,
                       num_kv_heads=4, head_dim=24, attn_block=0, remat="full")


def token_counts(program: str) -> set[int]:
    """Token counts of the whole batch that no collective of a well-laid-out program holds."""
    if program == "sample":  # the prefill of 16 prompts
        return {16 * PROMPT}
    if program == "sft":  # 16 rows of 128 tokens, and the 127 positions that predict a token
        return {16 * (PROMPT + RESPONSE), 16 * (PROMPT + RESPONSE - 1)}
    rows = PAIRS if program == "train" else 16
    return {rows * (PROMPT + 2 * RESPONSE), 2 * rows * RESPONSE, 2 * rows * (RESPONSE - 1), rows * PROMPT}


def holds_token_count(c: collectives.Collective, counts: set[int]) -> bool:
    """A dimension, or a product of leading dimensions, equals one of `counts`."""
    for _, dims in c.shapes:
        prods = [math.prod(dims[:i]) for i in range(2, len(dims))]  # leading dimensions, not the whole shape
        if any(d in counts for d in dims) or any(p in counts for p in prods):
            return True
    return False


def compiled(program: str, mesh_shape, overrides=(), m: ModelConfig | None = None):
    """(Program, compiled HLO text, config, model config) of `program` ("train", "sft", "score" or
    "sample") on a (data, fsdp, tensor) mesh of this machine's devices."""
    cfg = load_config(os.path.join(ROOT, "configs/tiny_test.yaml"), [*OVERRIDES, *overrides])
    m = m or model()
    if cfg.model.lora.rank:
        m = lora.base_config(m, cfg.model)
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:math.prod(mesh_shape)])
    build = {"train": plan.train_program, "sft": plan.sft_program, "score": plan.score_program,
             "sample": plan.sample_program}[program]
    prog = build(cfg, m, mesh)
    return prog, prog.lower().compile().as_text(), cfg, m


def weight_bytes(m: ModelConfig, dtype_bytes: int, lora_rank: int = 0) -> float:
    """Bytes of every weight the forward multiplies by (the layers, the embedding and the head)."""
    shapes = transformer.param_shapes(m)
    return float(sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))) * dtype_bytes


@functools.lru_cache(maxsize=None)
def found(program: str, mesh_shape: tuple, overrides: tuple = ()):
    """(collectives of the compiled program, its Program, config, model config), compiled once per
    test session."""
    prog, text, cfg, m = compiled(program, mesh_shape, overrides)
    return collectives.collectives(text, unknown_trips=prog.unknown_trips), prog, cfg, m


def main() -> None:
    """Print the figures tests/test_layouts.py checks: python -m tests.layouts"""
    cases = (("train", (1, 8, 1), ()), ("train", (1, 8, 1), ("train.opponent_logps=in_step",)),
             ("train", (1, 8, 1), ("model.lora.rank=4",)), ("score", (1, 8, 1), ()), ("sample", (1, 8, 1), ()),
             ("train", (2, 2, 2), ()), ("score", (2, 2, 2), ()), ("sample", (2, 2, 2), ()))
    for name, mesh_shape, extra in cases:
        cs, prog, cfg, m = found(name, mesh_shape, extra)
        print(json.dumps({"program": name, "mesh": mesh_shape, "overrides": extra, "runs_on": prog.mesh,
                          "bytes": {k: v for k, v in collectives.totals(cs).items() if v},
                          "weights": weight_bytes(m, 4),
                          "whole_batch": [collectives.describe(c) for c in cs
                                          if holds_token_count(c, token_counts(name))]}))


if __name__ == "__main__":
    main()
