"""Model configuration: one frozen dataclass for the whole Llama family.

Llama, Mistral (sliding-window attention), Qwen2 (q/k/v bias) and SmolLM2 (a Llama) differ only
in a few fields here; the forward pass in `transformer.py` reads them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

ARCHITECTURES = ("llama", "mistral", "qwen2")
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3 style rope scaling: {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: Optional[tuple] = None  # stored as a sorted tuple of items (hashable)
    max_position_embeddings: int = 8192
    tie_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q, k, v projections
    sliding_window: Optional[int] = None  # Mistral: attend to at most this many past tokens
    architecture: str = "llama"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots
    attn_block: int = 128  # queries per block of causal attention without a cache (0: one block)
    # Unroll the layer and vocab-chunk loops. Only `spin-jax plan` sets it: XLA's cost analysis
    # counts a loop body once, so the programs it counts FLOPs of have no loops.
    unroll_loops: bool = False

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"model.architecture={self.architecture!r}; expected one of {ARCHITECTURES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))

    @property
    def rope_scaling_dict(self) -> Optional[dict[str, Any]]:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.attention_bias:
            attn += self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return l * per_layer + emb + d


def tiny_config(architecture: str = "llama", **kw) -> ModelConfig:
    """A random-weight test model of the given architecture (fast on CPU)."""
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512,
                architecture=architecture)
    if architecture == "qwen2":
        base.update(attention_bias=True)
    if architecture == "mistral":
        base.update(sliding_window=4)
    base.update(kw)
    return ModelConfig(**base)
