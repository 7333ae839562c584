"""Attention through JAX's Pallas TPU kernel (splash attention) for training and scoring.

`model.attention` picks the implementation: "auto" runs the kernel on TPU backends and the XLA
path (`spin_jax.model.attention`) elsewhere; "splash" forces the Mosaic kernel (TPU only);
"splash-interpret" runs the same kernel in Pallas interpret mode, which any backend can execute
(tests and debugging on CPU); "xla" forces the XLA path.

What the kernel computes equals the XLA path's masks for every row layout spin_jax builds:
    - causal: query t sits at key slot offset + t and sees slots <= offset + t;
    - sliding window (Mistral): and slots > offset + t - window;
    - padding, left (prompts) or right (responses): a segment id per token, 1 valid and 0 padding,
      and a query sees only keys of its own segment;
    - packed rows (SFT): several sequences side by side take their own segment ids 1, 2, ...;
    - grouped-query attention: the kernel takes H query heads against K key/value heads;
    - the shared-prefix layout: a response's keys are its prompt's (left-padded) followed by its
      own, so its queries start at offset = prompt length.
The window counts slots where the XLA path counts positions: the two agree because positions
advance by one per slot over the valid tokens of every layout here (left-padded prompt, then its
response; a packed sequence, whose positions restart at 0). Padding queries see padding keys
instead of nothing; their outputs feed only padding tokens, which no loss or valid key reads.

The kernel tiles in blocks of KERNEL_BLOCK queries and keys, so rows are padded: the keys on the
left up to a multiple of the block before the queries' first slot, and queries and keys on the
right by the same count. Mosaic calls cannot be partitioned automatically, so on a mesh the
kernel runs under `jax.shard_map`: rows and heads split by the rule table (`spin_jax.sharding`)
where the mesh axes divide them (`sharding.on_mesh` names the mesh while a program traces).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from spin_jax import sharding

KERNEL_BLOCK = 128  # the kernel's key blocks must be multiples of 128 (TPU lanes)

def causal_attention(q, k, v, q_valid, k_valid, *, offset: int, window, interpret: bool, softcap=None,
                     mesh=None):
    """Splash attention -> [B, T, H, E].

    q [B, T, H, E]; k, v [B, S, K, E]; q_valid [B, T], k_valid [B, S] bool, or int32 segment ids
    (0 padding) of packed rows; query t at key slot
    offset + t (offset = S - T: the keys end with the queries' own). window: Mistral's sliding
    window or None. softcap: Gemma 2's score soft-capping (the kernel's attn_logits_soft_cap).
    mesh: the mesh the program's arrays live on (None: one device)."""
    t, e = q.shape[1], q.shape[3]
    s = k.shape[1]
    if s - t != offset:
        raise ValueError(f"keys ({s}) must end with the queries' own ({t}) at offset {offset}")
    # 1/sqrt(E) scales q as on the XLA path (in fp32, then back to the input dtype)
    q = (q.astype(jnp.float32) / np.sqrt(e).astype(np.float32)).astype(k.dtype)
    left = -offset % KERNEL_BLOCK  # keys before the first query slot: a multiple of the block
    right = -t % KERNEL_BLOCK
    tp, sp = t + right, s + left + right
    pad = lambda a, lo, hi: jnp.pad(a, [(0, 0), (lo, hi)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
    # [B, heads, length, E]: the kernel's layout, one batch row per call
    qh = pad(q, 0, right).transpose(0, 2, 1, 3)
    kh_, vh = (pad(a, left, right).transpose(0, 2, 1, 3) for a in (k, v))
    q_seg = pad(q_valid.astype(jnp.int32), 0, right)
    k_seg = pad(k_valid.astype(jnp.int32), left, right)
    one = (splash_mask.CausalMask((tp, sp), offset=offset + left) if window is None else
           splash_mask.LocalMask((tp, sp), window_size=(window - 1, 0), offset=offset + left))

    def run(qh, kh_, vh, q_seg, k_seg):
        heads = qh.shape[1]
        kernel = splash.make_splash_mha(
            splash_mask.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1,
            block_sizes=_block_sizes(), residual_checkpoint_name="attn_out", attn_logits_soft_cap=softcap,
            interpret=interpret)
        return jax.vmap(kernel)(qh, kh_, vh, splash.SegmentIds(q_seg, k_seg))

    out = _sharded(run, mesh, qh, kh_, vh, q_seg, k_seg)
    return out[:, :, :t].transpose(0, 2, 1, 3).astype(q.dtype)


def _block_sizes():
    n = KERNEL_BLOCK
    return splash.BlockSizes(block_q=n, block_kv=n, block_kv_compute=n, block_q_dkv=n, block_kv_dkv=n,
                             block_kv_dkv_compute=n, block_q_dq=n, block_kv_dq=n)


def _sharded(run, mesh, qh, kh, vh, q_seg, k_seg):
    """`run` on each shard of `mesh` (directly without one), split by the rule table: rows as
    "batch", heads as "kv_heads" (the query heads are a multiple of them, so they split alike)."""
    if mesh is None or mesh.size == 1:
        return run(qh, kh, vh, q_seg, k_seg)
    four = sharding.logical_to_spec(("batch", "kv_heads", None, None), kh.shape, mesh)
    two = P(four[0], None)
    return jax.shard_map(run, mesh=mesh, in_specs=(four, four, four, two, two), out_specs=four,
                         check_vma=False)(qh, kh, vh, q_seg, k_seg)
