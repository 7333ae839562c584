"""Where a decode step's time goes (spin_jax only): the model's matmuls alone, a full cached
decode step, and the same step attending to only 16 cache slots. SmolLM2-135M, fp32.

    python bench/bench_decode_step.py --batch 64 --cache 192
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cache", type=int, default=192)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()

    from spin_jax.io.load import load_model
    from spin_jax.model import cache as cache_lib
    from spin_jax.model import transformer

    m = load_model("smollm2-135m-instruct")
    cfg, b = m.cfg, args.batch
    params = jax.device_put(m.params)
    full_attention = transformer.attention

    def step_ms(attention) -> float:
        transformer.attention = attention
        try:
            step = jax.jit(lambda p, t, pos, c: transformer.forward(p, cfg, t, pos, cache=c), donate_argnums=(3,))
            cache = cache_lib.init_cache(cfg, b, args.cache)
            tok, pos = jnp.ones((b, 1), jnp.int32), jnp.zeros((b, 1), jnp.int32)
            logits, cache = step(params, tok, pos, cache)
            jax.block_until_ready(logits)
            t0 = time.perf_counter()
            for i in range(args.steps):
                logits, cache = step(params, tok, pos + i, cache)
            jax.block_until_ready(logits)
            return (time.perf_counter() - t0) / args.steps * 1e3
        finally:
            transformer.attention = full_attention

    def matmuls(p, x):  # the same weights, no norms, rope, cache or attention
        def layer(x, lp):
            q = jnp.einsum("bd,dhe->bhe", x, lp["wq"])
            kv = jnp.einsum("bd,dke->bke", x, lp["wk"]).sum() + jnp.einsum("bd,dke->bke", x, lp["wv"]).sum()
            x = x + jnp.einsum("bhe,hed->bd", q, lp["wo"])
            g, u = jnp.einsum("bd,df->bf", x, lp["w_gate"]), jnp.einsum("bd,df->bf", x, lp["w_up"])
            return x + jnp.einsum("bf,fd->bd", g * u, lp["w_down"]) + kv, None
        x, _ = jax.lax.scan(layer, x, p["layers"])
        return x @ p["embed"].T

    f = jax.jit(matmuls)
    x = jnp.ones((b, cfg.hidden_size))
    jax.block_until_ready(f(params, x))
    t0 = time.perf_counter()
    for _ in range(args.steps):
        y = f(params, x)
    jax.block_until_ready(y)
    mm = (time.perf_counter() - t0) / args.steps * 1e3
    full = step_ms(full_attention)
    small = step_ms(lambda q, kt, v, mask: full_attention(q, kt[..., :16], v[:, :, :16], mask[..., :16]))
    print(f"batch {b}, cache {args.cache} slots: matmuls only {mm:.1f} ms | decode step {full:.1f} ms | "
          f"decode step attending to 16 slots {small:.1f} ms | attention over the cache ~{full - small:.1f} ms")


if __name__ == "__main__":
    main()
