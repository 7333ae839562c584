"""`python bench/matmul_peak.py`: the fp32 matmul GFLOP/s that XLA:CPU (jitted `x @ y`) and PyTorch
(`torch.matmul`) reach on this machine, best of 5 after a warm-up: a large square matmul (near the
machine's peak) and SmolLM2-135M's training shapes (1024 tokens x 576 -> 1536, 1536 -> 576, and the
49,152-column head). The ceiling a train step's tokens/s can be read against (bench/RESULTS.md)."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

SHAPES = [(2048, 2048, 2048), (1024, 576, 1536), (1024, 1536, 576), (1024, 576, 49152)]


def best_seconds(f, *args, n: int = 5) -> float:
    def run():
        out = f(*args)
        if hasattr(out, "block_until_ready"):
            out.block_until_ready()

    run()
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    rng = np.random.default_rng(0)
    matmul = jax.jit(lambda x, y: x @ y)
    for m, k, n in SHAPES:
        a, b = rng.random((m, k), np.float32), rng.random((k, n), np.float32)
        flops = 2 * m * k * n
        t_jax = best_seconds(matmul, jnp.asarray(a), jnp.asarray(b))
        t_torch = best_seconds(torch.matmul, torch.from_numpy(a), torch.from_numpy(b))
        print(f"{m}x{k}x{n}: jax {flops / t_jax / 1e9:.0f} GFLOP/s, torch {flops / t_torch / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
