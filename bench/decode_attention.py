"""Is the sampler's XLA decode attention at the memory floor on TPU? (The figures behind keeping XLA
for decoding rather than a paged or ragged Pallas kernel.)

A decode step reads every weight and the KV cache once per generated token; nothing can read
less. This compiles the config's decode step (one token for sampling.batch_size rows against the
full cache, on one host's mesh of the slice, as `spin-jax plan` does) with XLA:TPU at 2 and 3
layers, and prints per layer and chip: the HBM bytes the compiler's cost analysis counts, the
layer's argument bytes (its weights and its cache slice: the floor), and their ratio. It does the
same with a cache twice as long: what the longer cache adds is attention's own traffic, against
the cache bytes added (a kernel could at best bring that ratio to 1).

    PYTHONPATH=.venv/tpu python bench/decode_attention.py --config configs/zephyr_ultrachat_tpu.yaml \
        --topology v5p-32
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spin_jax import plan, sharding  # noqa: E402
from spin_jax.config import load_config  # noqa: E402
from spin_jax.io.load import model_config_only  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--topology", required=True)
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    cfg = load_config(a.config, a.set)
    m = model_config_only(cfg.model.name, cfg.model.shapes_config).replace(
        dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
    kind, chip, devices = plan.topology(a.topology)
    hosts = sorted({d.process_index for d in devices})
    local = sharding.make_local_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor,
                                     devices=[d for d in devices if d.process_index == hosts[0]],
                                     num_processes=len(hosts))
    p = plan._lengths(cfg)[0]
    per_layer = {}
    for new in (cfg.sampling.max_new_tokens, cfg.sampling.max_new_tokens + p + cfg.sampling.max_new_tokens):
        c = load_config(a.config, a.set + [f"sampling.max_new_tokens={new}"])
        decode, _ = plan.sample_program(c, m, local).parts[1]
        figures = {}
        for layers in (2, 3):
            compiled = plan.compile_program(decode(layers, True), list(local.devices.flat))
            figures[layers] = (compiled.bytes_accessed, compiled.argument_bytes)
        per_layer[p + new] = tuple(figures[3][i] - figures[2][i] for i in (0, 1))
    print(f"decode step, {a.topology} one host {dict(local.shape)}, batch {cfg.sampling.batch_size}, "
          f"{m.dtype} compute over {m.param_dtype} weights; per layer and chip (MB):")
    for length, (hbm, floor) in per_layer.items():
        print(f"  cache {length:>5} slots: HBM bytes (cost analysis) {hbm / 1e6:8.2f}, weights + cache slice "
              f"(floor) {floor / 1e6:8.2f}, ratio {hbm / floor:.2f}")
    (l1, (h1, f1)), (l2, (h2, f2)) = per_layer.items()
    print(f"  attention over the {l2 - l1} added slots: HBM bytes {(h2 - h1) / 1e6:.2f}, cache bytes added "
          f"{(f2 - f1) / 1e6:.2f}, ratio {(h2 - h1) / (f2 - f1):.2f}")


if __name__ == "__main__":
    main()
