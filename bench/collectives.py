"""What each program moves between chips, read from its compiled HLO (no run, no weights).

    # 8 simulated CPU devices, the tiny test shapes (fsdp 8, or data 2 x fsdp 2 x tensor 2)
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/collectives.py --mesh 1,8,1
    # the paper config's shapes at 2 layers with the XLA:TPU compiler (libtpu from `make venv-tpu`)
    PYTHONPATH=.venv/tpu python bench/collectives.py --config configs/zephyr_ultrachat_tpu.yaml \
        --topology v5p-32 --layers 2 --attention xla

Per program and chip: the GB of each collective kind per call (loop bodies times their trips, the
sampler's decode loops times max_new_tokens - 1 steps in all), the largest collective, and for the
sampler the bytes all-gathered per decode-loop body.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/tiny_test.yaml")
    ap.add_argument("--topology", default=None, help="a TPU slice (needs libtpu); default: this machine's devices")
    ap.add_argument("--mesh", default=None, help="data,fsdp,tensor on this machine's devices (default: the config's)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--attention", default=None, help="model.attention for the compiled programs (xla | splash)")
    ap.add_argument("--programs", default="train,score,sample")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    import jax

    from spin_jax import collectives, plan, sharding
    from spin_jax.config import load_config
    from spin_jax.io.load import model_config_only

    cfg = load_config(args.config, args.overrides)
    m = model_config_only(cfg.model.name, cfg.model.shapes_config, cfg.model.revision)
    m = m.replace(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat,
                  attn_block=cfg.model.attn_block, num_layers=args.layers,
                  attention=args.attention or ("splash" if cfg.model.attention == "auto" and args.topology
                                               else "xla" if cfg.model.attention == "auto" else cfg.model.attention))
    if cfg.model.lora.rank:
        from spin_jax.model import lora

        m = lora.base_config(m, cfg.model)
    if args.topology:
        _, _, devices = plan.topology(args.topology)
    else:
        devices = jax.devices()
    sizes = [int(x) for x in args.mesh.split(",")] if args.mesh else [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    mesh = sharding.make_mesh(*sizes, devices=devices)
    hosts = sorted({d.process_index for d in devices})
    local = sharding.make_local_mesh(*sizes, devices=[d for d in devices if d.process_index == hosts[0]],
                                     num_processes=len(hosts))
    builders = {"train": (plan.train_program, mesh), "score": (plan.score_program, local),
                "sample": (plan.sample_program, local)}
    rows = []
    for name in args.programs.split(","):
        build, program_mesh = builders[name]
        program = build(cfg, m, program_mesh)
        text = program.lower().compile().as_text()
        found = collectives.collectives(text, unknown_trips=program.unknown_trips)
        total = collectives.totals(found)
        big = collectives.largest(found)
        row = {"program": name, "mesh": program.mesh or dict(program_mesh.shape),
               "gb_per_call": sum(total.values()) / 1e9,
               "by_kind_gb": {k: v / 1e9 for k, v in total.items() if v},
               "largest": collectives.describe(big) if big else "-", "largest_gb": big.bytes / 1e9 if big else 0.0}
        line = (f"{name:<7}{str(row['mesh']):<36}{row['gb_per_call']:>10.3f} GB/chip/call  largest {row['largest']} "
                f"({row['largest_gb']:.3f} GB)")
        if name == "sample":  # all-gathers in one decode loop's body (one step), the largest of the phases
            decode = [c for c in found if c.in_data_dependent_loop and c.kind == "all-gather"]
            per_body = {}
            for c in decode:
                per_body[c.loops[0][0]] = per_body.get(c.loops[0][0], 0.0) + c.bytes * c.trips / c.loops[0][1]
            row["decode_body_all_gather_mb"] = max(per_body.values(), default=0.0) / 1e6
            line += f"  decode-body all-gather {row['decode_body_all_gather_mb']:.1f} MB"
        rows.append(row)
        print(line)
        print("        " + ", ".join(f"{k} {v:.3f} GB" for k, v in row["by_kind_gb"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
