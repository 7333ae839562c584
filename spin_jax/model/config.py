"""Model configuration: one frozen dataclass for every supported family.

Llama, Mistral (sliding-window attention), Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm), Gemma 2 and
Gemma 3 differ only in fields here; the forward pass in `transformer.py` reads them. The Gemmas
add: embeddings scaled by sqrt(hidden), RMSNorm weights applied as (1 + w) in float32, norms after
attention and the MLP as well as before, GeGLU (tanh GELU), `query_pre_attn_scalar`, local
(sliding-window) layers interleaved with global ones, each with its RoPE base (Gemma 3), q/k
RMSNorm (Gemma 3) and logit soft-capping of attention scores and of the output (Gemma 2).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from spin_jax.config import ATTENTION

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
GEMMA = ("gemma2", "gemma3")
ACTIVATIONS = ("silu", "gelu_tanh")
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
    # Gemma: which layers are local (use sliding_window); the others attend to everything. None:
    # sliding_window (if any) applies to every layer. Stored as a tuple of bools, one per layer.
    local_layers: Optional[tuple] = None
    rope_local_theta: Optional[float] = None  # Gemma 3: the local layers' RoPE base (default rope_theta)
    activation: str = "silu"  # the gated MLP's: silu (SwiGLU) or gelu_tanh (GeGLU)
    query_pre_attn_scalar: Optional[float] = None  # Gemma: scores scaled by its -1/2 power, not head_dim's
    attn_softcap: Optional[float] = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: Optional[float] = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    architecture: str = "llama"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots
    attn_block: int = 128  # queries per block of causal attention without a cache (0: one block)
    # Training and scoring attention: auto (the Pallas splash kernel on TPU, XLA elsewhere), xla,
    # splash, or splash-interpret (the kernel in Pallas interpret mode, on any backend)
    attention: str = "auto"
    # LoRA, when adapters are attached to the params (model.lora): the update's scale alpha / rank,
    # and the dropout rate on the adapters' input in training
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    # Unroll the layer and vocab-chunk loops. Only `spin-jax plan` sets it: XLA's cost analysis
    # counts a loop body once, so the programs it counts FLOPs of have no loops.
    unroll_loops: bool = False

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"model.architecture={self.architecture!r}; expected one of {ARCHITECTURES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION:
            raise ValueError(f"model.attention={self.attention!r}; expected one of {ATTENTION}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; expected one of {ACTIVATIONS}")
        if self.local_layers is not None:
            object.__setattr__(self, "local_layers", tuple(bool(x) for x in self.local_layers))
            if len(self.local_layers) != self.num_layers:
                raise ValueError(f"local_layers has {len(self.local_layers)} entries for {self.num_layers} layers")
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

    # Traits fixed by the family (derived from `architecture`, not stored)
    @property
    def qk_norm(self) -> bool:
        """Qwen3, Gemma 3: RMSNorm over head_dim on q and k before RoPE."""
        return self.architecture in ("qwen3", "gemma3")

    @property
    def gemma_norm(self) -> bool:
        """Gemma: RMSNorm weight applied as (1 + w), in float32, then cast."""
        return self.architecture in GEMMA

    @property
    def sandwich_norms(self) -> bool:
        """Gemma: also a norm after attention and after the MLP."""
        return self.architecture in GEMMA

    @property
    def embed_scale(self) -> bool:
        """Gemma: embeddings times sqrt(hidden_size)."""
        return self.architecture in GEMMA

    def layer_windows(self) -> tuple:
        """Each layer's sliding window (None: the layer attends to everything)."""
        if self.local_layers is None:
            return (self.sliding_window,) * self.num_layers
        return tuple(self.sliding_window if local else None for local in self.local_layers)

    @property
    def mixed_layers(self) -> bool:
        """Local and global layers both present: masks and RoPE tables are chosen per layer."""
        return len(set(self.layer_windows())) > 1

    def num_params(self) -> int:
        d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.attention_bias:
            attn += self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * self.head_dim
        per_layer = attn + 3 * d * f + (4 if self.sandwich_norms else 2) * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return l * per_layer + emb + d


def gemma_local_layers(architecture: str, num_layers: int, every: Optional[int] = None) -> tuple:
    """Gemma's interleave when a file does not list its layer kinds: a global layer every `every`
    layers, the others local (default: every 2nd in Gemma 2, every 6th in Gemma 3)."""
    every = every or (2 if architecture == "gemma2" else 6)
    return tuple((i + 1) % every != 0 for i in range(num_layers))


def tiny_config(architecture: str = "llama", **kw) -> ModelConfig:
    """A random-weight test model of the given architecture (fast on CPU)."""
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512,
                architecture=architecture)
    if architecture == "qwen2":
        base.update(attention_bias=True)
    if architecture == "mistral":
        base.update(sliding_window=4)
    if architecture == "qwen3":
        base.update(tie_embeddings=True)
    if architecture in GEMMA:
        base.update(num_layers=3, sliding_window=4, local_layers=(True, False, True), activation="gelu_tanh",
                    query_pre_attn_scalar=24.0, tie_embeddings=True)
    if architecture == "gemma2":
        base.update(attn_softcap=50.0, final_softcap=30.0)
    if architecture == "gemma3":
        base.update(rope_local_theta=10000.0, rope_theta=1000000.0)
    base.update(kw)
    return ModelConfig(**base)
