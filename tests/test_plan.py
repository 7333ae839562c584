"""`spin-jax plan`: the FLOPs correction against an analytic count, and real XLA:TPU compiles of the
iteration's programs for TPU topologies (libtpu from `make venv-tpu`, which `make test` runs)."""

import json
import os
import subprocess
import sys

import jax
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
    raw, _ = plan._cost(program.lower().compile())
    want = analytic_train_flops(m, pairs=4, p=64, r=64)
    assert abs(corrected / want - 1) < 0.10, (corrected, want)
    assert raw < 0.5 * want  # the layer scan (4 layers) and 2 micro-batches each counted once


def run_plan(args, timeout=600):
    if not os.path.isdir(os.path.join(TPU_PATH, "libtpu")):
        pytest.skip(f"no libtpu in {TPU_PATH}: `make venv-tpu` installs it (make test does)")
    env = dict(os.environ, PYTHONPATH=TPU_PATH)
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
    assert all(r[-6] == "yes" for r in rows.values()), out  # fits
    assert f"plan for {topology}" in out and "not a measurement on a TPU" in out


def test_plan_of_the_paper_model_two_layers_on_v5p_32():
    """Two layers of the 7B model's shapes sharded over 16 v5p chips (fsdp=16), at a quarter of the
    paper's batch and half its lengths; memory figures only (no cost copies), so the test compiles
    in under a minute."""
    rc, out, err = run_plan(["--config", "configs/zephyr_ultrachat_tpu.yaml", "--topology", "v5p-32", "--layers", "2",
                             "--programs", "train", "--memory-only", "--set", "train.global_batch_size=16",
                             "--set", "data.max_length=512", "--set", "data.max_prompt_length=256"])
    assert rc == 0, out + err
    (train,) = [line.split() for line in out.splitlines() if line.startswith("train ")]
    assert "'fsdp': 16" in out and train[-6] == "yes", out


def test_lora_on_a_quantized_base_compiles_every_program(tiny_shapes):
    """LoRA on an nf4 base, in-step opponent: the train step (adapters as its state, the quantized
    base an argument), scoring and sampling on the quantized base compile for a v5e-8."""
    rc, out, err = run_plan(["--config", "configs/tiny_test.yaml", "--topology", "v5e-8", *tiny_shapes,
                             "--memory-only", "--set", "train.opponent_logps=in_step", "--set", "model.lora.rank=8",
                             "--set", "model.base_dtype=nf4"])
    assert rc == 0, out + err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["train"], ["score"],
                                                                                              ["sample"])}
    assert set(rows) == {"train", "score", "sample"} and all(r[-6] == "yes" for r in rows.values()), out
    assert all(r[-4] == "-" for r in rows.values()), out  # --memory-only: no FLOPs counted


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
    out[name] = build(cfg, m, mesh).lower().compile().as_text().count("tpu_custom_call")
print(json.dumps(out))
"""


def test_kernel_path_compiles_for_a_tpu_topology():
    """The train step (in-step opponent) and the scoring program with splash attention (GQA,
    sliding window, bf16, over the 8 chips of a v5e-8 under shard_map) compile with XLA:TPU: the
    kernels are lowered by Mosaic and appear as TPU custom calls, forward (prompt and responses, for
    the policy and the opponent) and backward (dq and dkv)."""
    if not os.path.isdir(os.path.join(TPU_PATH, "libtpu")):
        pytest.skip(f"no libtpu in {TPU_PATH}: `make venv-tpu` installs it (make test does)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TPU_PATH, ROOT]), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    p = subprocess.run([sys.executable, "-c", KERNEL_COMPILE], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    calls = json.loads(p.stdout.strip().splitlines()[-1])
    assert calls["score"] == 2, calls  # a prompt's attention and its responses'
    assert calls["train"] >= 2 * 2 + 2 * 2, calls  # forward for policy and opponent, dq and dkv for the policy
