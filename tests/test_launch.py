"""launch/tpu_pod.py against a fake `gcloud` (and `gsutil`) on PATH that record their argv: the
create/install/run/copy/delete commands, --dry-run, and the errors for a missing gcloud or setting."""

import json
import os
import re
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu_pod.py")
SETTINGS = ["--name", "spin-v4", "--zone", "us-central2-b", "--project", "my-proj"]
FAKE = """#!{python}
import json, os, sys
with open(os.environ["FAKE_CLOUD_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
"""


@pytest.fixture
def fake_bin(tmp_path):
    """A directory holding fake gcloud and gsutil executables."""
    d = tmp_path / "bin"
    d.mkdir()
    for tool in ("gcloud", "gsutil"):
        path = d / tool
        path.write_text(FAKE.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return d


def launch(args, tmp_path, path_dirs, env=None, stdin=None):
    log = tmp_path / "calls.jsonl"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPIN_TPU_")}
    full_env.update(PATH=os.pathsep.join(map(str, path_dirs)), FAKE_CLOUD_LOG=str(log), **(env or {}))
    p = subprocess.run([sys.executable, SCRIPT, *args], cwd=tmp_path, env=full_env, capture_output=True,
                       text=True, input=stdin, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return p, calls


def ok(args, tmp_path, fake_bin, **kw):
    p, calls = launch(args, tmp_path, [fake_bin, "/usr/bin", "/bin"], **kw)
    assert p.returncode == 0, p.stderr
    return p, calls


def test_create_defaults_to_an_on_demand_v4_8(tmp_path, fake_bin):
    _, calls = ok(["create", *SETTINGS], tmp_path, fake_bin)
    assert calls == [["gcloud", "compute", "tpus", "tpu-vm", "create", "spin-v4", "--accelerator-type", "v4-8",
                      "--version", "tpu-ubuntu2204-base", "--zone", "us-central2-b", "--project", "my-proj"]]


def test_create_spot_v5e_picks_its_runtime(tmp_path, fake_bin):
    _, calls = ok(["create", *SETTINGS, "--accelerator-type", "v5litepod-8", "--spot"], tmp_path, fake_bin)
    (call,) = calls
    assert call[call.index("--accelerator-type") + 1] == "v5litepod-8"
    assert call[call.index("--version") + 1] == "v2-alpha-tpuv5-lite"
    assert call[-1] == "--spot"


def test_install_clones_and_builds_the_venv_with_jax_tpu_on_every_worker(tmp_path, fake_bin):
    repo = "https://github.com/example/spin_jax.git"
    _, calls = ok(["install", *SETTINGS, "--repo", repo, "--ref", "v1"], tmp_path, fake_bin)
    (call,) = calls
    assert call[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "spin-v4"]
    assert "--worker=all" in call
    script = call[call.index("--command") + 1]
    jax_pin = re.search(r"^jax==(\S+)$", open(os.path.join(ROOT, "requirements.txt")).read(), re.M).group(1)
    steps = [f"git clone -q {repo} spin_jax", "cd spin_jax", "git fetch -q origin v1", "git checkout -q FETCH_HEAD",
             "make venv PYTHON=python3.11", f'.venv/bin/pip install -q "jax[tpu]=={jax_pin}"']
    positions = [script.index(s) for s in steps]
    assert positions == sorted(positions), script  # in this order
    assert call[-4:] == ["--zone", "us-central2-b", "--project", "my-proj"]


def test_run_trains_on_all_workers_with_overrides_and_a_shared_compile_cache(tmp_path, fake_bin):
    _, calls = ok(["run", *SETTINGS, "--iter", "2", "--config", "configs/zephyr_ultrachat_tpu.yaml",
                   "--set", "mesh.fsdp=-1", "--set", "runs_dir=/mnt/shared/runs"], tmp_path, fake_bin)
    (call,) = calls
    assert "--worker=all" in call
    # the venv, then spin-jax itself (make would turn its exit 42, stopped by SIGTERM, into 2), with
    # the compile cache on the shared runs directory
    assert call[call.index("--command") + 1] == (
        "cd spin_jax && make -s venv && SPIN_JAX_COMPILE_CACHE=/mnt/shared/runs/.xla_cache .venv/bin/python -m "
        "spin_jax train --config configs/zephyr_ultrachat_tpu.yaml --iter 2 --set distributed.coordinator_address=auto "
        "--set mesh.fsdp=-1 --set runs_dir=/mnt/shared/runs")
    _, calls = ok(["run", *SETTINGS, "--compile-cache", "off"], tmp_path, fake_bin)
    assert "SPIN_JAX_COMPILE_CACHE" not in calls[-1][calls[-1].index("--command") + 1]


def test_run_spin_and_a_bad_override(tmp_path, fake_bin):
    _, calls = ok(["run", *SETTINGS, "--target", "spin", "--iters", "3"], tmp_path, fake_bin)
    assert " -m spin_jax spin --config configs/cpu_default.yaml --iters 3 " in calls[0][calls[0].index("--command") + 1]
    p, calls = launch(["run", *SETTINGS, "--set", "a=$(rm -rf ~)"], tmp_path, [fake_bin])
    assert p.returncode == 2 and "--set" in p.stderr and "KEY=VALUE" in p.stderr and len(calls) == 1


def test_run_benchmark_passes_its_tasks_and_refuses_them_elsewhere(tmp_path, fake_bin):
    _, calls = ok(["run", *SETTINGS, "--target", "benchmark", "--iter", "1", "--tasks", "open_llm"], tmp_path, fake_bin)
    command = calls[0][calls[0].index("--command") + 1]
    assert "make -s venv-eval && " in command and " benchmark --config configs/cpu_default.yaml --iter 1 " \
        "--tasks open_llm " in command
    p, calls = launch(["run", *SETTINGS, "--tasks", "open_llm"], tmp_path, [fake_bin])
    assert p.returncode == 2 and "--target benchmark" in p.stderr


def test_copy_scp_from_worker_0_or_rsync_from_gcs(tmp_path, fake_bin):
    _, calls = ok(["copy", *SETTINGS, "--run", "zephyr", "--dest", "out"], tmp_path, fake_bin)
    assert calls == [["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "--worker=0",
                      "spin-v4:spin_jax/runs/zephyr", "out", "--zone", "us-central2-b", "--project", "my-proj"]]
    assert (tmp_path / "out").is_dir()
    os.remove(tmp_path / "calls.jsonl")
    _, calls = ok(["copy", *SETTINGS, "--runs-dir", "gs://bucket/runs/", "--run", "zephyr", "--dest", "out"],
                  tmp_path, fake_bin)
    assert calls == [["gsutil", "-m", "rsync", "-r", "gs://bucket/runs/zephyr", os.path.join("out", "zephyr")]]


def test_delete_needs_yes_or_typing_the_name(tmp_path, fake_bin):
    p, calls = launch(["delete", *SETTINGS], tmp_path, [fake_bin], stdin="")
    assert p.returncode == 2 and "--yes" in p.stderr and calls == []  # no TTY, no --yes: refused
    _, calls = ok(["delete", *SETTINGS, "--yes"], tmp_path, fake_bin)
    assert calls == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "spin-v4", "--quiet",
                      "--zone", "us-central2-b", "--project", "my-proj"]]


def test_dry_run_prints_the_commands_and_needs_no_gcloud(tmp_path, fake_bin):
    empty = tmp_path / "empty"
    empty.mkdir()
    p, calls = launch(["delete", *SETTINGS, "--dry-run"], tmp_path, [empty])
    assert p.returncode == 0, p.stderr
    assert p.stdout == ("gcloud compute tpus tpu-vm delete spin-v4 --quiet --zone us-central2-b "
                        "--project my-proj\n") and calls == []
    p, calls = launch(["run", *SETTINGS, "--iter", "1", "--dry-run"], tmp_path, [fake_bin])
    assert p.returncode == 0 and calls == []  # gcloud is there but is not called
    assert p.stdout.startswith("gcloud compute tpus tpu-vm ssh spin-v4 --worker=all --command 'cd spin_jax && "
                               "make -s venv && SPIN_JAX_COMPILE_CACHE=runs/.xla_cache .venv/bin/python -m spin_jax "
                               "train --config configs/cpu_default.yaml --iter 1 ")


def test_missing_gcloud_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    p, _ = launch(["create", *SETTINGS], tmp_path, [empty])
    assert p.returncode == 2
    assert "gcloud not found on PATH" in p.stderr and "--dry-run" in p.stderr
    assert "Traceback" not in p.stderr


def test_missing_settings_name_each_flag_and_env_var(tmp_path, fake_bin):
    p, calls = launch(["create", "--name", "spin-v4"], tmp_path, [fake_bin])
    assert p.returncode == 2 and calls == []
    assert "--zone" in p.stderr and "SPIN_TPU_ZONE" in p.stderr
    assert "--project" in p.stderr and "SPIN_TPU_PROJECT" in p.stderr and "--name" not in p.stderr
    # the environment variables fill them in
    _, calls = ok(["status"], tmp_path, fake_bin,
                  env={"SPIN_TPU_NAME": "n", "SPIN_TPU_ZONE": "z", "SPIN_TPU_PROJECT": "p"})
    assert calls == [["gcloud", "compute", "tpus", "tpu-vm", "describe", "n", "--zone", "z", "--project", "p"]]
