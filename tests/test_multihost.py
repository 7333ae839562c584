"""A real multi-process run: 2 JAX processes x 4 CPU devices (gloo collectives, coordinator on
localhost) run `spin-jax train --iter 0` (generate + train) and give the parameters of 1 process x
8 devices trained on the same data; each host writes only its own shards, and every file of the
run directory has exactly one writing process (host 0 for metrics, summary, config, model)."""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600

# Runs the `spin-jax` entry point after recording, in $SPIN_TEST_WRITE_LOG, every path this
# process opens for writing or renames into place (open/io.open/pathlib and os.replace/rename).
AUDITED_CLI = r"""
import builtins, io, os, sys
_log_path, _open, _replace, _rename = os.environ["SPIN_TEST_WRITE_LOG"], io.open, os.replace, os.rename
def _record(path):
    if isinstance(path, (str, bytes, os.PathLike)):
        with _open(_log_path, "a") as f:
            f.write(os.path.abspath(os.fsdecode(path)) + "\n")
def _audited_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
        _record(file)
    return _open(file, mode, *args, **kwargs)
def _audited_replace(src, dst, *args, **kwargs):
    _record(dst)
    return _replace(src, dst, *args, **kwargs)
def _audited_rename(src, dst, *args, **kwargs):
    _record(dst)
    return _rename(src, dst, *args, **kwargs)
builtins.open = io.open = _audited_open
os.replace, os.rename = _audited_replace, _audited_rename
from spin_jax.cli import main
main(sys.argv[1:])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_cli(args, devices, write_log, extra_env=None):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", SPIN_TEST_WRITE_LOG=write_log, **(extra_env or {}))
    return subprocess.Popen([sys.executable, "-c", AUDITED_CLI, *args, "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_all(procs, code=0):
    """Outputs of all processes; if one exits with another code than `code` or hangs, the others are
    stopped and all shown."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode != code for p in procs):
        pytest.fail("\n".join(f"--- process {i} (exit {p.returncode}) ---\n{o}"
                              for i, (p, o) in enumerate(zip(procs, outs))))
    return outs


def store_rows(run_dir):
    rows = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "iter0", "synthetic", "shard-*.jsonl"))):
        for line in open(path):
            row = json.loads(line)
            rows[row["id"]] = row
    return rows


def written(write_log):
    return set(open(write_log).read().split()) if os.path.exists(write_log) else set()


def test_two_processes_of_4_devices_train_like_one_process_of_8(tiny_model_dir, tmp_path):
    data_dir, runs = str(tmp_path / "tfds"), str(tmp_path / "runs")
    common = ["--config", "configs/tiny_test.yaml", "--set", f"model.name={tiny_model_dir}",
              "--set", f"data.data_dir={data_dir}", "--set", f"runs_dir={runs}"]
    multi = os.path.join(runs, "multi")

    # 2 processes x 4 devices: generate + train; host 0 also prepares the TFDS data set first
    port = free_port()
    logs = [str(tmp_path / f"writes-{i}.txt") for i in range(2)]
    procs = [start_cli(["train", "--iter", "0", *common, "--set", "run_name=multi",
                       "--set", f"distributed.coordinator_address=localhost:{port}",
                       "--set", "distributed.num_processes=2", "--set", f"distributed.process_id={i}"],
                      4, logs[i]) for i in range(2)]
    outs = wait_all(procs)
    assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in outs[0]  # one global mesh over both hosts
    assert outs[0].count("=== SPIN iteration 0") == 1 and "[spin-jax]" not in outs[1]

    # each host sampled and scored its own chunks (chunk c -> host c % 2) into its own shards
    shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(multi, "iter0", "synthetic", "shard-*")))
    assert shards == ["shard-00000-000000.jsonl", "shard-00001-000001.jsonl"]
    w0, w1 = written(logs[0]), written(logs[1])
    synthetic = os.path.join(multi, "iter0", "synthetic")
    assert {p for p in w1 if "/shard-" in p} == {os.path.join(synthetic, "shard-00001-000001.jsonl")}
    assert {p for p in w0 if "/shard-" in p} == {os.path.join(synthetic, "shard-00000-000000.jsonl")}
    # nothing was written by both processes, except the store's index (rewritten under its lock
    # file by each host for its own shards) and orbax's per-process checkpoint files; os.devnull is
    # no file (`dill`, which TFDS imports where it is installed, opens it for writing)
    shared_index = {os.path.join(synthetic, n) for n in ("manifest.json", ".lock")} | {os.devnull}
    both = {p for p in w0 & w1 if p not in shared_index}
    assert not both, sorted(both)
    assert not any(p.startswith(data_dir) for p in w1)  # host 0 prepared the shared data_dir
    outside_ckpt = {p for p in w1 if "/checkpoints/" not in p} - shared_index
    assert {os.path.basename(p) for p in outside_ckpt} == {"shard-00001-000001.jsonl"}, sorted(outside_ckpt)
    for name in ("metrics.jsonl", "summary.json", "config.json", "model"):  # model: model.tmp renamed
        assert os.path.join(multi, "iter0", name) in w0, name
    assert {p for p in w1 if "/checkpoints/" in p} <= {p for p in w1 if p.endswith("/array_metadatas/process_1")}
    steps = [json.loads(line)["step"] for line in open(os.path.join(multi, "iter0", "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4]
    assert len(os.listdir(os.path.join(multi, "iter0", "tensorboard"))) == 1
    assert {"3", "4"} <= set(os.listdir(os.path.join(multi, "iter0", "checkpoints")))
    assert not os.path.exists(os.path.join(multi, "iter0", "model.tmp"))

    # 1 process x 8 devices samples exactly the same responses (seeds are per chunk), and the
    # opponent's log-probs agree to float32 rounding (4- vs 8-device scoring meshes)
    single_log = str(tmp_path / "writes-single.txt")
    wait_all([start_cli(["generate", "--iter", "0", *common, "--set", "run_name=single_gen"], 8, single_log)])
    mine, theirs = store_rows(os.path.join(runs, "single_gen")), store_rows(multi)
    assert sorted(mine) == sorted(theirs) and len(mine) == 16
    for i in mine:
        assert mine[i]["generated"] == theirs[i]["generated"], i
        np.testing.assert_allclose([mine[i]["opponent_logp_real"], mine[i]["opponent_logp_generated"]],
                                   [theirs[i]["opponent_logp_real"], theirs[i]["opponent_logp_generated"]],
                                   rtol=1e-5)

    # 1 process x 8 devices trained on the same store gives the same parameters
    os.makedirs(os.path.join(runs, "single", "iter0"))
    shutil.copytree(synthetic, os.path.join(runs, "single", "iter0", "synthetic"))
    out = wait_all([start_cli(["train", "--iter", "0", *common, "--set", "run_name=single"], 8, single_log)])[0]
    assert "sampling" not in out  # the copied store is complete: nothing regenerated
    one = load_file(os.path.join(runs, "single", "iter0", "model", "model.safetensors"))
    two = load_file(os.path.join(multi, "iter0", "model", "model.safetensors"))
    base = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        rel = np.linalg.norm(two[k] - one[k]) / np.linalg.norm(one[k])
        assert rel <= 1e-5, (k, rel)
    assert any(not np.array_equal(one[k], base[k]) for k in one)  # training moved the model


def test_sigterm_to_one_host_checkpoints_and_stops_both(tiny_model_dir, tmp_path):
    """Spot/preemptible pods: a SIGTERM that reaches only host 1 still makes both hosts save the
    same checkpoint step and exit 42, stopped and resumable (the flag is agreed across processes every update)."""
    import signal
    import time

    runs = str(tmp_path / "runs")
    port = free_port()
    procs = [start_cli(["train", "--iter", "0", "--config", "configs/tiny_test.yaml",
                       "--set", f"model.name={tiny_model_dir}", "--set", f"data.data_dir={tmp_path / 'tfds'}",
                       "--set", f"runs_dir={runs}", "--set", "run_name=r", "--set", "train.epochs=500",
                       "--set", f"distributed.coordinator_address=localhost:{port}",
                       "--set", "distributed.num_processes=2", "--set", f"distributed.process_id={i}"],
                      4, str(tmp_path / f"writes-{i}.txt")) for i in range(2)]
    metrics = os.path.join(runs, "r", "iter0", "metrics.jsonl")
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.exists(metrics) and open(metrics).read().strip():
            break
        time.sleep(0.1)
    assert all(p.poll() is None for p in procs), "a process ended before training started"
    procs[1].send_signal(signal.SIGTERM)
    outs = wait_all(procs, code=42)
    assert "SIGTERM: checkpoint" in outs[0]
    steps = [int(s) for s in os.listdir(os.path.join(runs, "r", "iter0", "checkpoints")) if s.isdigit()]
    assert steps and max(steps) < 1000  # stopped early, with a checkpoint
    assert not os.path.exists(os.path.join(runs, "r", "iter0", "model"))
