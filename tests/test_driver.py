"""The iteration driver end to end on a tiny random model: generate + train, kill -9 or SIGTERM and
resume, the opponent frozen, iteration 1 finding iteration 0's model."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from spin_jax import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """The CLI runs of this module share a compilation cache of their own, apart from the session's,
    as they kill runs with -9 (what a killed run leaves in it meets only these tests): reruns (the
    kill -9 resume, iteration 1) load compiled programs from it, and it is kept between sessions
    beside the session's cache (`<session cache>-driver`), as a user's cache outlives a killed run.
    With the session's cache off, a temporary folder."""
    session = os.environ.get("SPIN_JAX_COMPILE_CACHE", "")
    off = not session or rundir.cache_off(session)
    path = str(tmp_path_factory.mktemp("xla_cache")) if off else session.rstrip("/") + "-driver"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPIN_JAX_COMPILE_CACHE", path)
        mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        yield path


def overrides(model_dir, data_dir, runs_dir, run="r"):
    return ["--set", f"model.name={model_dir}", "--set", f"data.data_dir={data_dir}",
            "--set", f"runs_dir={runs_dir}", "--set", f"run_name={run}"]


def cli(args, **kw):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "spin_jax", *args, "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def run_ok(args):
    p = cli(args)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return out


def final_tensors(runs_dir, run, t=0):
    return load_file(os.path.join(runs_dir, run, f"iter{t}", "model", "model.safetensors"))


def kill_9_after(p, metrics, ckpts, kill_at):
    """SIGKILL the run `p` once `kill_at` updates are logged and at least one (async) checkpoint is final."""
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if (os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= kill_at
                and os.path.isdir(ckpts) and any(c.isdigit() for c in os.listdir(ckpts))):
            break
        time.sleep(0.02)
    assert p.poll() is None, "training finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()


def test_kill_9_or_sigterm_then_rerun_equals_uninterrupted_run(tiny_model_dir, data_dir, tmp_path, compile_cache):
    base = ["train", "--config", "configs/tiny_test.yaml", "--iter", "0", "--set", "train.epochs=4"]
    runs = str(tmp_path / "runs")
    run_ok(base + overrides(tiny_model_dir, data_dir, runs, "full"))
    stored = set(os.listdir(compile_cache))
    assert any("train_step" in f for f in stored), stored  # the resumed run below loads it from here
    full = final_tensors(runs, "full")
    summary = json.load(open(os.path.join(runs, "full", "iter0", "summary.json")))
    assert summary["steps"] == 8 and summary["skipped_updates"] == 0
    # the interrupted run reuses the same synthetic data (generation is tested elsewhere)
    os.makedirs(os.path.join(runs, "killed", "iter0"))
    shutil.copytree(os.path.join(runs, "full", "iter0", "synthetic"),
                    os.path.join(runs, "killed", "iter0", "synthetic"))
    metrics = os.path.join(runs, "killed", "iter0", "metrics.jsonl")
    ckpts = os.path.join(runs, "killed", "iter0", "checkpoints")
    kill_at = int(np.random.default_rng().integers(1, 6))  # of 8 updates
    kill_9_after(cli(base + overrides(tiny_model_dir, data_dir, runs, "killed")), metrics, ckpts, kill_at)
    assert not os.path.exists(os.path.join(runs, "killed", "iter0", "model"))
    out = run_ok(base + overrides(tiny_model_dir, data_dir, runs, "killed"))
    assert "resumed from checkpoint" in out
    resumed = final_tensors(runs, "killed")
    for k in full:
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)

    # SIGTERM (a spot VM's notice): a checkpoint, exit 42 (stopped, resumable; 0 means finished), and
    # the same command finishes with the uninterrupted result
    os.makedirs(os.path.join(runs, "term", "iter0"))
    shutil.copytree(os.path.join(runs, "full", "iter0", "synthetic"), os.path.join(runs, "term", "iter0", "synthetic"))
    p = cli(base + overrides(tiny_model_dir, data_dir, runs, "term"))
    metrics = os.path.join(runs, "term", "iter0", "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not (os.path.exists(metrics) and open(metrics).read()):
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 42 and "SIGTERM: checkpoint" in out, out
    assert not os.path.exists(os.path.join(runs, "term", "iter0", "model"))
    assert any(c.isdigit() for c in os.listdir(os.path.join(runs, "term", "iter0", "checkpoints")))
    assert "resumed from checkpoint" in run_ok(base + overrides(tiny_model_dir, data_dir, runs, "term"))
    resumed = final_tensors(runs, "term")
    for k in full:
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)


def test_iteration_1_uses_iteration_0_model_and_leaves_opponent_untouched(tiny_model_dir, data_dir, tmp_path):
    runs = str(tmp_path / "runs")
    args = overrides(tiny_model_dir, data_dir, runs)
    p = cli(["train", "--config", "configs/tiny_test.yaml", "--iter", "1", *args])
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 1 and "make train ITER=0" in out  # a clear refusal naming the command
    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    run_ok(["spin", "--config", "configs/tiny_test.yaml", "--iters", "2", *args])
    after = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    for k in before:  # the base model (iteration 0's opponent) is bit-identical
        np.testing.assert_array_equal(before[k], after[k])
    it0, it1 = final_tensors(runs, "r", 0), final_tensors(runs, "r", 1)
    assert any(not np.array_equal(before[k], it0[k]) for k in before)  # the policy moved
    assert any(not np.array_equal(it0[k], it1[k]) for k in it0)
    cfg1 = json.load(open(os.path.join(runs, "r", "iter1", "config.json")))
    assert cfg1["opponent"] == os.path.join(runs, "r", "iter0", "model")
    rows1 = [json.loads(line) for f in sorted(os.listdir(os.path.join(runs, "r", "iter1", "synthetic")))
             if f.startswith("shard-") for line in open(os.path.join(runs, "r", "iter1", "synthetic", f))]
    s0 = json.load(open(os.path.join(runs, "r", "iter0", "summary.json")))
    s1 = json.load(open(os.path.join(runs, "r", "iter1", "summary.json")))
    assert s1["steps"] == 2 * s0["steps"]  # iteration 1 trains on iteration 0's + its own pairs
    assert len(rows1) == 16 and all(r["opponent_logp_real"] is not None for r in rows1)


SFT = ["--set", "sft.global_batch_size=2", "--set", "sft.epochs=3", "--set", "sft.packing=true",
       "--set", "data.max_length=256", "--set", "train.checkpoint_every=1"]


def sft_tensors(runs_dir, run, folder="sft"):
    return load_file(os.path.join(runs_dir, run, folder, "model", "model.safetensors"))


def test_sft_kill_9_then_rerun_equals_uninterrupted_run(tiny_model_dir, data_dir, tmp_path):
    runs = str(tmp_path / "runs")
    base = ["sft", "--config", "configs/tiny_test.yaml", *SFT]
    run_ok(base + overrides(tiny_model_dir, data_dir, runs, "full"))
    full = sft_tensors(runs, "full")
    summary = json.load(open(os.path.join(runs, "full", "sft", "summary.json")))
    assert summary["steps"] == summary["updates"] >= 4 and summary["skipped_updates"] == 0, summary
    metrics = os.path.join(runs, "killed", "sft", "metrics.jsonl")
    ckpts = os.path.join(runs, "killed", "sft", "checkpoints")
    kill_at = int(np.random.default_rng().integers(1, summary["steps"] - 1))
    kill_9_after(cli(base + overrides(tiny_model_dir, data_dir, runs, "killed")), metrics, ckpts, kill_at)
    assert not os.path.exists(os.path.join(runs, "killed", "sft", "model"))
    out = run_ok(base + overrides(tiny_model_dir, data_dir, runs, "killed"))
    assert "resumed from checkpoint" in out
    resumed = sft_tensors(runs, "killed")
    for k in full:
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)


def test_model_init_sft_runs_sft_first_and_the_baseline_takes_iteration_0s_updates(tiny_model_dir, data_dir,
                                                                                  tmp_path):
    runs = str(tmp_path / "runs")
    args = [*SFT, "--set", "model.init=sft", *overrides(tiny_model_dir, data_dir, runs)]
    out = run_ok(["train", "--config", "configs/tiny_test.yaml", "--iter", "0", *args])
    assert "SFT runs first" in out
    sft_model = os.path.join(runs, "r", "sft", "model")
    assert json.load(open(os.path.join(runs, "r", "iter0", "config.json")))["opponent"] == sft_model
    base, sft0 = load_file(os.path.join(tiny_model_dir, "model.safetensors")), sft_tensors(runs, "r")
    assert any(not np.array_equal(base[k], sft0[k]) for k in base)  # SFT moved the model
    run_ok(["sft", "--config", "configs/tiny_test.yaml", "--init", "iter0", *args])
    s0 = json.load(open(os.path.join(runs, "r", "iter0", "summary.json")))
    baseline = json.load(open(os.path.join(runs, "r", "sft_from_iter0", "summary.json")))
    assert baseline["steps"] == s0["steps"] and baseline["start_model"] == sft_model
    run_ok(["export", "--config", "configs/tiny_test.yaml", "--sft", "iter0", "--out", str(tmp_path / "exported"),
            *args])
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    stored = sft_tensors(runs, "r", "sft_from_iter0")
    assert exported.keys() == stored.keys() and all(np.array_equal(exported[k], stored[k]) for k in stored)
    p = cli(["sft", "--config", "configs/tiny_test.yaml", "--init", "iter3", *args])
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 1 and "pass --updates N" in out
