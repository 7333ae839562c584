"""Fault injection on a tiny model: damaged checkpoints, non-finite parameters, two runs on one
iteration, paths the commands do not own, a full disk, oversized and self-overwriting inputs."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny_test.yaml")
TRAIN = ["train", "--config", CONFIG, "--iter", "0", "--set", "train.epochs=3", "--set", "train.checkpoint_every=2",
         "--set", "train.keep_checkpoints=3"]


@pytest.fixture(scope="module")
def env():
    """Environment of the CLI runs: one device (and the session's compilation cache, conftest.py)."""
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def sets(model_dir, data_dir, runs_dir, run="r"):
    return ["--set", f"model.name={model_dir}", "--set", f"data.data_dir={data_dir}", "--set", f"runs_dir={runs_dir}",
            "--set", f"run_name={run}"]


def cli(args, env, cwd=ROOT, **kw):
    return subprocess.Popen([sys.executable, "-m", "spin_jax", *args, "--no-progress"] if args[0] in (
        "train", "generate", "evaluate", "export") else [sys.executable, "-m", "spin_jax", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def run(args, env, cwd=ROOT):
    p = cli(args, env, cwd)
    out, _ = p.communicate(timeout=600)
    return p.returncode, out


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, data_dir, env, tmp_path_factory):
    """An uninterrupted 6-update run with checkpoints at updates 2, 4 and 6."""
    runs = str(tmp_path_factory.mktemp("runs"))
    rc, out = run(TRAIN + sets(tiny_model_dir, data_dir, runs, "full"), env)
    assert rc == 0, out
    it = os.path.join(runs, "full", "iter0")
    assert sorted(os.listdir(os.path.join(it, "checkpoints"))) == ["2", "4", "6"]
    return runs, it


def copy_unexported(full_run, tmp_path, name):
    """The full run's iteration as if killed after its last checkpoint: no model, no summary."""
    runs = str(tmp_path / "runs")
    it = os.path.join(runs, name, "iter0")
    shutil.copytree(full_run[1], it)
    shutil.rmtree(os.path.join(it, "model"))
    os.remove(os.path.join(it, "summary.json"))
    return runs, it


def largest_file(directory):
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def overwrite_4k(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(max(0, size // 2 - 2048))
        f.write(np.random.default_rng(0).integers(0, 256, min(4096, size), dtype=np.uint8).tobytes())


def truncate_half(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def empty_metadata(step_dir):
    paths = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs if f == "_METADATA"]
    assert paths, os.listdir(step_dir)
    for p in paths:
        open(p, "w").close()


@pytest.mark.parametrize("damage", ["overwrite_4k", "truncate", "empty_metadata"])
def test_damaged_newest_checkpoint_falls_back_and_finishes_bit_identical(full_run, tiny_model_dir, data_dir, env,
                                                                         tmp_path, damage):
    runs, it = copy_unexported(full_run, tmp_path, "damaged")
    step6 = os.path.join(it, "checkpoints", "6")
    if damage == "overwrite_4k":
        overwrite_4k(largest_file(step6))
    elif damage == "truncate":
        truncate_half(largest_file(step6))
    else:
        empty_metadata(step6)
    rc, out = run(TRAIN + sets(tiny_model_dir, data_dir, runs, "damaged"), env)
    assert rc == 0, out
    assert f"checkpoint {step6} is damaged" in out and "resumed from checkpoint step 4" in out, out
    aside = os.listdir(os.path.join(it, "checkpoints_damaged"))
    assert len(aside) == 1 and aside[0].startswith("6-")  # kept, renamed, never deleted
    want = load_file(os.path.join(full_run[1], "model", "model.safetensors"))
    got = load_file(os.path.join(it, "model", "model.safetensors"))
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    steps = [json.loads(line)["step"] for line in open(os.path.join(it, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4, 5, 6]  # the redone updates logged once


def test_torn_summary_of_a_finished_iteration_is_rebuilt(full_run, tiny_model_dir, data_dir, env, tmp_path):
    runs = str(tmp_path / "runs")
    it = os.path.join(runs, "torn", "iter0")
    shutil.copytree(full_run[1], it)
    with open(os.path.join(it, "summary.json"), "w") as f:
        f.write('{"steps": 6, "first_qu')
    rc, out = run(TRAIN + sets(tiny_model_dir, data_dir, runs, "torn"), env)
    assert rc == 0 and "already trained" in out, out
    rebuilt = json.load(open(os.path.join(it, "summary.json")))
    original = json.load(open(os.path.join(full_run[1], "summary.json")))
    assert rebuilt["steps"] == 6 and rebuilt["first_quarter"] == pytest.approx(original["first_quarter"])


def test_diverging_training_stops_and_exports_nothing(full_run, tiny_model_dir, data_dir, env, tmp_path):
    runs = str(tmp_path / "runs")
    it = os.path.join(runs, "nan", "iter0")
    os.makedirs(it)
    shutil.copytree(os.path.join(full_run[1], "synthetic"), os.path.join(it, "synthetic"))
    rc, out = run(TRAIN + sets(tiny_model_dir, data_dir, runs, "nan") + ["--set", "train.learning_rate=1e30"], env)
    assert rc == 1 and "updates were skipped for a non-finite loss or gradients" in out, out
    assert "Traceback" not in out and not os.path.exists(os.path.join(it, "model"))


def test_non_finite_parameters_are_never_exported(full_run, tiny_model_dir, data_dir, env, tmp_path):
    runs = str(tmp_path / "runs")
    it = os.path.join(runs, "poisoned", "iter0")
    shutil.copytree(full_run[1], it)
    weights = os.path.join(it, "model", "model.safetensors")
    tensors = load_file(weights)
    tensors["model.embed_tokens.weight"][3, :5] = np.nan
    save_file(tensors, weights, metadata={"format": "pt"})
    out_dir = str(tmp_path / "export")
    rc, out = run(["export", "--config", CONFIG, "--iter", "0", "--out", out_dir]
                  + sets(tiny_model_dir, data_dir, runs, "poisoned"), env)
    assert rc == 1 and "NaN or Inf" in out and "model.embed_tokens.weight" in out, out
    assert not os.path.exists(out_dir) and not [n for n in os.listdir(tmp_path) if n.startswith(".export")]


def test_second_train_on_the_same_iteration_fails_at_once(tiny_model_dir, data_dir, env, tmp_path):
    runs = str(tmp_path / "runs")
    args = TRAIN + sets(tiny_model_dir, data_dir, runs, "twice")
    first = cli(args, env)
    lock = os.path.join(runs, "twice", "iter0", ".lock")
    deadline = time.time() + 300
    while not (os.path.exists(lock) and open(lock).read()) and time.time() < deadline:
        time.sleep(0.2)
    t0 = time.time()
    rc, out = run(args, env)
    assert rc == 1 and f"is in use by pid {first.pid}" in out, out
    assert time.time() - t0 < 60  # refused at once, no model loaded
    out_first, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out_first
    steps = [json.loads(line)["step"] for line in open(os.path.join(runs, "twice", "iter0", "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_export_and_report_never_touch_what_they_do_not_own(full_run, tiny_model_dir, data_dir, env, tmp_path):
    args = ["--config", CONFIG, "--iter", "0"] + sets(tiny_model_dir, data_dir, full_run[0], "full")
    unrelated = tmp_path / "out.tmp"
    unrelated.mkdir()
    (unrelated / "keep.txt").write_text("mine")
    rc, out = run(["export", *args, "--out", str(tmp_path / "out")], env)
    assert rc == 0 and (tmp_path / "out" / "model.safetensors").exists(), out
    assert (unrelated / "keep.txt").read_text() == "mine"
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "keep.txt").write_text("mine")
    (tmp_path / "a_file").write_text("mine")
    (tmp_path / "a_link").symlink_to(tmp_path / "empty", target_is_directory=True)
    (tmp_path / "empty").mkdir()
    for out_arg, message in (("", "--out is empty"), (str(tmp_path / "a_file"), "is a file"),
                             (str(tmp_path / "a_link"), "is a symlink"), (str(tmp_path / "out"), "not empty"),
                             (os.path.join(full_run[1], "model", "inside"), "overlaps")):
        rc, out = run(["export", *args, "--out", out_arg], env, cwd=str(tmp_path))
        assert rc == 2 and message in out and "Traceback" not in out, (out_arg, out)
    assert (tmp_path / ".tmp" / "keep.txt").exists() and (tmp_path / "a_file").read_text() == "mine"
    # report: refreshes its own report, refuses a directory holding anything else
    report = tmp_path / "report"
    rc, out = run(["report", "--run", os.path.join(full_run[0], "full"), "--out", str(report)], env)
    assert rc == 0 and (report / "report.md").exists(), out
    rc, out = run(["report", "--run", os.path.join(full_run[0], "full"), "--out", str(report)], env)
    assert rc == 0, out
    rc, out = run(["report", "--run", os.path.join(full_run[0], "full"), "--out", str(unrelated)], env)
    assert rc == 2 and "files a report does not write" in out and (unrelated / "keep.txt").exists(), out


def test_output_equal_to_input_and_oversized_prompts_are_refused(tiny_model_dir, env, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n")
    before = rows.read_bytes()
    for command in (["score", "--model", tiny_model_dir, "--input", str(rows), "--output", str(rows)],
                    ["sample", "--model", tiny_model_dir, "--input", str(rows), "--output", str(rows)]):
        rc, out = run(command, env)
        assert rc == 2 and "is also the input" in out, out
    assert rows.read_bytes() == before
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"prompt": "word " * 1_000_000}) + "\n")
    rc, out = run(["sample", "--model", tiny_model_dir, "--input", str(big), "--output", str(tmp_path / "o.jsonl"),
                   "--max-new-tokens", "4"], env)
    assert rc == 1 and f"{big}:2: the prompt is" in out and "over the limit of 508" in out, out
    assert not (tmp_path / "o.jsonl").exists()
    rc, out = run(["score", "--model", tiny_model_dir, "--input", str(tmp_path), "--output", str(tmp_path / "o")], env)
    assert rc == 1 and "is a directory" in out and "Traceback" not in out, out


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: room for an iteration's data, not for a checkpoint."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or 'mount failed'}); needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_one_clear_line_and_a_rerun_finishes(full_run, tiny_model_dir, data_dir, env, small_disk):
    runs = str(small_disk / "runs")
    it = os.path.join(runs, "disk", "iter0")
    shutil.copytree(os.path.join(full_run[1], "synthetic"), os.path.join(it, "synthetic"))
    rc, out = run(TRAIN + sets(tiny_model_dir, data_dir, runs, "disk"), env)
    assert rc == 1 and "no space left on the device" in out, out
    assert "Traceback" not in out and out.count("error:") == 1, out
    assert not os.path.exists(os.path.join(it, "model"))
    subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)
    rc, out = run(TRAIN + sets(tiny_model_dir, data_dir, runs, "disk"), env)
    assert rc == 0 and os.path.exists(os.path.join(it, "model", "model.safetensors")), out


def test_damaged_model_files_are_errors_that_name_the_file(tiny_model_dir, tmp_path):
    from spin_jax.io import gguf_io, hf

    def copy(name):
        d = tmp_path / name
        shutil.copytree(tiny_model_dir, d)
        return d

    d = copy("list_config")
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"^{d}/config.json: expected a JSON object"):
        hf.read_hf_dir(str(d))
    d = copy("torn_config")
    (d / "config.json").write_text('{"model_type": "lla')
    with pytest.raises(ValueError, match=rf"^{d}/config.json: not valid JSON"):
        hf.read_hf_dir(str(d))
    d = copy("no_heads")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["num_attention_heads"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"^{d}/config.json: missing key 'num_attention_heads'"):
        hf.read_hf_dir(str(d))
    d = copy("truncated")
    truncate_half(d / "model.safetensors")
    with pytest.raises(ValueError, match=rf"^{d}/model.safetensors: not a readable safetensors file"):
        hf.read_hf_dir(str(d))
    d = copy("escaping_index")
    (tmp_path / "outside.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "../outside.safetensors"}}))
    with pytest.raises(ValueError, match="weight_map names '../outside.safetensors', outside the model directory"):
        hf.read_hf_dir(str(d))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTGGUF" + bytes(64))
    with pytest.raises(ValueError, match=rf"^{bad}: not a readable GGUF file"):
        gguf_io.read_gguf(str(bad))
    from spin_jax.io.load import resolve_model_path

    real = resolve_model_path("smollm2-135m-instruct")
    size = os.path.getsize(real)
    for name, keep in (("empty", 0), ("cut_in_metadata", 100_000), ("cut_in_tensors", size - 1_000_000)):
        cut = tmp_path / f"{name}.gguf"
        with open(real, "rb") as f:
            cut.write_bytes(f.read(keep))
        with pytest.raises(ValueError, match=rf"^{cut}: not a readable GGUF file"):
            gguf_io.read_gguf(str(cut))
