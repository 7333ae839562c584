"""`spin-jax plan`: the FLOPs correction against an analytic count, and real XLA:TPU compiles of the
iteration's programs for TPU topologies (libtpu from `make venv-tpu`, which `make test` runs)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from spin_jax import plan, sharding
from spin_jax.config import load_config
from spin_jax.model.config import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_PATH = os.environ.get("SPIN_JAX_TPU_PATH", os.path.join(ROOT, ".venv", "tpu"))


def analytic_train_flops(m, pairs, p, r):
    """FLOPs of one precomputed-mode train step, remat none, one attention block, counted by hand:
    the layers' matmuls forward (2 per weight and token) and backward (4); the output projection
    on response positions forward, and its hand-written backward (recomputed logits + two
    gradients); attention's two matmuls forward and five in its hand-written backward."""
    d, h, k, e, f, v = m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.intermediate_size, m.vocab_size
    per_token = d * (h + 2 * k) * e + h * e * d + 3 * d * f  # weights a token multiplies by, per layer
    tokens = pairs * (p + 2 * (r - 1))  # each prompt once; a response's last token is never an input
    layers = 6 * per_token * tokens * m.num_layers
    head = (2 + 6) * d * v * pairs * 2 * r
    qk = h * e * (p * p + 2 * (r - 1) * (p + r - 1))  # score entries x E, per pair and layer
    attention = (2 + 5) * 2 * qk * pairs * m.num_layers
    return layers + head + attention


def test_corrected_flops_match_the_analytic_count():
    """The scan over layers and the scan over micro-batches are each counted once by XLA's cost
    analysis; the corrected count is within 10% of the hand count, the raw one is far below it."""
    cfg = load_config("configs/tiny_test.yaml", ["train.opponent_logps=precomputed", "train.grad_accum=2",
                                                  "train.global_batch_size=4", "data.max_prompt_length=64",
                                                  "data.max_length=128", "model.remat=none", "model.attn_block=0"])
    m = tiny_config("llama", vocab_size=512, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
                    num_kv_heads=2, head_dim=64, attn_block=0)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    program = plan.train_program(cfg, m, mesh)
    corrected, _ = plan.corrected_cost(program, m.num_layers)
    raw = plan.compile_program(program.lower()).flops
    want = analytic_train_flops(m, pairs=4, p=64, r=64)
    assert abs(corrected / want - 1) < 0.10, (corrected, want)
    assert raw < 0.5 * want  # the layer scan (4 layers) and 2 micro-batches each counted once


def run_plan(args, timeout=600, **env_vars):
    if not os.path.isdir(os.path.join(TPU_PATH, "libtpu")):
        pytest.skip(f"no libtpu in {TPU_PATH}: `make venv-tpu` installs it (make test does)")
    env = dict(os.environ, PYTHONPATH=TPU_PATH, **env_vars)
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_PLATFORMS", None)
    p = subprocess.run([sys.executable, "-m", "spin_jax", "plan", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    path = tmp_path_factory.mktemp("shapes") / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256,
                                "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "head_dim": 32, "max_position_embeddings": 512, "tie_word_embeddings": True}))
    return ["--set", "model.name=not-downloaded", "--set", f"model.shapes_config={path}"]


@pytest.mark.parametrize("topology", ["v5e-8", "v5p-8"])
def test_plan_compiles_every_program_for_a_tpu_slice(topology, tiny_shapes):
    rc, out, err = run_plan(["--config", "configs/tiny_test.yaml", "--topology", topology, *tiny_shapes])
    assert rc == 0, out + err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["train"], ["score"],
                                                                                              ["sample"])}
    assert set(rows) == {"train", "score", "sample"}, out
    assert all(r[-8] == "yes" for r in rows.values()), out  # fits
    assert f"plan for {topology}" in out and "not a measurement on a TPU" in out


def test_lora_on_a_quantized_base_compiles_every_program(tiny_shapes):
    """LoRA on an nf4 base, in-step opponent: the train step (adapters as its state, the quantized
    base an argument), scoring and sampling on the quantized base compile for a v5e-8."""
    rc, out, err = run_plan(["--config", "configs/tiny_test.yaml", "--topology", "v5e-8", *tiny_shapes,
                             "--memory-only", "--set", "train.opponent_logps=in_step", "--set", "model.lora.rank=8",
                             "--set", "model.base_dtype=nf4"])
    assert rc == 0, out + err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["train"], ["score"],
                                                                                              ["sample"])}
    assert set(rows) == {"train", "score", "sample"} and all(r[-8] == "yes" for r in rows.values()), out
    assert all(r[-6] == "-" for r in rows.values()), out  # --memory-only: no FLOPs counted


def test_a_second_plan_loads_every_compile_from_the_plan_cache_and_prints_the_same_table(tiny_shapes, tmp_path):
    """A private plan cache: the second run compiles nothing and prints the first run's table; another
    topology, or another batch size of the same programs, compiles again."""
    def plan_with_cache(*extra):
        rc, out, err = run_plan(["--config", "configs/tiny_test.yaml", *tiny_shapes, "--programs", "score", *extra],
                                SPIN_JAX_PLAN_CACHE=str(tmp_path / "plan"))
        assert rc == 0, out + err
        return out, err

    first, err = plan_with_cache("--topology", "v5e-8")
    assert "compiled score" in err and "from the plan cache" not in err, err
    entries = sorted(os.listdir(tmp_path / "plan"))
    assert len(entries) == 3, entries  # the program, and its unrolled copies at 2 and 3 layers
    again, err = plan_with_cache("--topology", "v5e-8")
    assert "loaded score for v5e-8 (from the plan cache" in err and "compiled score" not in err, err
    assert again == first and sorted(os.listdir(tmp_path / "plan")) == entries
    _, err = plan_with_cache("--topology", "v5e-8", "--memory-only", "--set", "sampling.batch_size=16")
    assert "compiled score" in err, err
    _, err = plan_with_cache("--topology", "v5e-4", "--memory-only")
    assert "compiled score" in err, err


def test_a_config_that_does_not_fit_exits_1_with_advice(tiny_shapes):
    rc, out, err = run_plan(["--config", "configs/tiny_test.yaml", "--topology", "v5e-1", *tiny_shapes,
                             "--programs", "sample", "--set", "sampling.batch_size=4096",
                             "--set", "sampling.max_new_tokens=4096", "--set", "data.max_length=4096",
                             "--set", "data.max_prompt_length=2048"])
    assert rc == 1 and "sample needs" in err and "lower sampling.batch_size" in err, out + err
    assert "Traceback" not in err


def test_default_commands_never_see_libtpu():
    """libtpu sits apart from the venv's packages: a plain start of JAX finds no TPU runtime."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("JAX_PLATFORMS", None)
    p = subprocess.run([sys.executable, "-c", "import importlib.util, jax; print(importlib.util.find_spec('libtpu'),"
                        " jax.devices()[0].platform)"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.split() == ["None", "cpu"], p.stdout + p.stderr
    assert "TPU" not in p.stderr and "libtpu" not in p.stderr, p.stderr


def run_with_libtpu(script: str, timeout: int, args=()):
    """Run a Python script (with `args` as sys.argv[1:]) with the TPU compiler on its path; its last
    line of output as JSON."""
    if not os.path.isdir(os.path.join(TPU_PATH, "libtpu")):
        pytest.skip(f"no libtpu in {TPU_PATH}: `make venv-tpu` installs it (make test does)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TPU_PATH, ROOT]), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    p = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


KERNEL_COMPILE = """
import json
from spin_jax import plan, sharding
from spin_jax.config import load_config
from spin_jax.model.config import tiny_config
cfg = load_config("configs/tiny_test.yaml", ["data.max_prompt_length=64", "data.max_length=160",
                                             "train.opponent_logps=in_step"])
kind, chip, devices = plan.topology("v5e-8")
mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
m = tiny_config("mistral", vocab_size=256, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2,
                head_dim=64, sliding_window=48, attention="splash", dtype="bfloat16", remat="dots")
out = {}
for name, build in (("train", plan.train_program), ("score", plan.score_program)):
    out[name] = plan.compile_program(build(cfg, m, mesh).lower(), devices).text.count("tpu_custom_call")
print(json.dumps(out))
"""


def test_kernel_path_compiles_for_a_tpu_topology():
    """The train step (in-step opponent) and the scoring program with splash attention (GQA,
    sliding window, bf16, over the 8 chips of a v5e-8 under shard_map) compile with XLA:TPU: the
    kernels are lowered by Mosaic and appear as TPU custom calls, forward (prompt and responses, for
    the policy and the opponent) and backward (dq and dkv)."""
    calls = run_with_libtpu(KERNEL_COMPILE, timeout=600)
    assert calls["score"] == 2, calls  # a prompt's attention and its responses'
    assert calls["train"] >= 2 * 2 + 2 * 2, calls  # forward for policy and opponent, dq and dkv for the policy


def test_cost_copies_partition_like_the_programs_that_run():
    """The unrolled copies that count FLOPs and bytes move per layer what the program that runs moves
    in one body of its layer scans (forward and backward): the same all-gathers, and the same bytes
    of each collective kind (XLA combines the copies' gradient all-reduces across layers, so their
    count differs). fsdp 8, XLA attention, 4 layers."""
    from layouts import compiled, model

    from spin_jax import collectives

    for program in ("train", "score"):
        prog, text, cfg, m = compiled(program, (1, 8, 1), m=model().replace(num_layers=4))
        body = [c for found in collectives.loop_bodies(text, trips=4) for c in found]
        lower_at = prog.parts[0][0]
        copies = [collectives.collectives(lower_at(n, unroll=True).compile().as_text()) for n in (2, 3)]
        gathers = [sum(c.kind == "all-gather" for c in found) for found in copies]
        assert gathers[1] - gathers[0] == sum(c.kind == "all-gather" for c in body) > 0, program
        per_layer = {k: v - collectives.totals(copies[0])[k] for k, v in collectives.totals(copies[1]).items()}
        np.testing.assert_allclose(list(per_layer.values()), list(collectives.totals(body).values()), rtol=0.01,
                                   err_msg=program)


TPU_LAYOUTS = """
import json, sys
sys.path.insert(0, "tests")
from spin_jax import collectives, plan, sharding
from spin_jax.config import load_config
from spin_jax.io.load import model_config_only
from layouts import holds_token_count
out = {}
wanted = dict(a.split(":") for a in sys.argv[1:])  # config kind -> comma-separated programs
for kind, config, topology, sets in (
        # batch sizes whose token counts are none of the model's dimensions (4096, 14336, 32000) nor the vocab chunk,
        # and 128-token prompts and responses: XLA:TPU's compile time grows with the tokens per chip, the layout not
        ("paper", "configs/zephyr_ultrachat_tpu.yaml", "v5p-32", ["train.global_batch_size=48", "data.max_length=256",
                                                         "data.max_prompt_length=128", "sampling.batch_size=12",
                                                         "sampling.max_new_tokens=32"]),
        ("lora", "configs/zephyr_lora_v5e8.yaml", "v5e-8", ["train.global_batch_size=24", "data.max_length=256",
                                                    "data.max_prompt_length=128", "sampling.batch_size=12",
                                                    "sampling.max_new_tokens=32"])):
    if kind not in wanted:
        continue
    cfg = load_config(config, sets)
    m = model_config_only(cfg.model.name, cfg.model.shapes_config).replace(
        num_layers=2, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat, attention="xla")
    if cfg.model.lora.rank:
        from spin_jax.model import lora
        m = lora.base_config(m, cfg.model)
    _, chip, devices = plan.topology(topology)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    hosts = sorted({d.process_index for d in devices})
    local = sharding.make_local_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, num_processes=len(hosts),
                                     devices=[d for d in devices if d.process_index == hosts[0]])
    p, r = plan._lengths(cfg)
    pairs, rows = cfg.train.global_batch_size, cfg.sampling.batch_size
    counts = {"train": {pairs * (p + 2 * r), 2 * pairs * r, 2 * pairs * (r - 1), pairs * p},
              "score": {rows * (p + 2 * r), 2 * rows * r, 2 * rows * (r - 1), rows * p}, "sample": {rows * p}}
    programs = (("train", plan.train_program, mesh), ("score", plan.score_program, local),
                ("sample", plan.sample_program, local))
    for name, build, pm in programs[:1] if cfg.model.lora.rank else programs:  # LoRA's score, sample: the base's
        if name not in wanted[kind].split(","):
            continue
        prog = build(cfg, m, pm, memory_bytes=chip.hbm_bytes) if name == "sample" else build(cfg, m, pm)
        compiled = plan.compile_program(prog.lower(), list(pm.devices.flat))
        found = collectives.collectives(compiled.text, unknown_trips=prog.unknown_trips)
        decode = [c for c in found if c.in_data_dependent_loop and c.kind == "all-gather"]
        mesh_shape = prog.mesh or dict(pm.shape)
        if name == "sample" and mesh_shape["data"] == 1:  # tensor-parallel: every row is on every chip
            counts[name] = set()
        out[f"{topology} {name}"] = {
            "mesh": mesh_shape, "fits": compiled.peak_bytes <= chip.hbm_bytes,
            "whole_batch": [collectives.describe(c) for c in found if holds_token_count(c, counts[name])],
            "decode_weight_gathers": [collectives.describe(c) for c in decode if c.elements >= m.hidden_size ** 2]}
print(json.dumps(out))
"""


def check_tpu_layouts(parts: list[str], expect: int) -> dict:
    """With XLA:TPU, the paper config's shapes at 2 layers on a v5p-32 (train over 16 chips, score and
    sample on one host's 4) and the LoRA config's train step on a v5e-8, XLA attention: each program fits the
    chip, no collective carries the whole batch's tokens (the sampler, tensor-parallel over all of a
    host's chips, holds every row on each), and the decode loop all-gathers no weight. `parts`:
    "paper:score,sample"-style selections (two test files share the compiles: tests/test_plan_train.py)."""
    out = run_with_libtpu(TPU_LAYOUTS, timeout=900, args=parts)
    assert len(out) == expect, out
    for name, got in out.items():
        assert got["fits"] and not got["whole_batch"] and not got["decode_weight_gathers"], (name, got)
    return out


def test_paper_config_scores_and_samples_on_tpu_moving_no_whole_batch_and_gathering_no_weights():
    out = check_tpu_layouts(["paper:score,sample"], 2)
    assert out["v5p-32 sample"]["mesh"]["tensor"] == 4, out
