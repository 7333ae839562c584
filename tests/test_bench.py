"""The GPU benchmark script runs to completion in its dry mode (tiny sizes, CPU)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_benchmark_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "bench/gpu.py", "--dry", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["tiny"]
    for key in ("jax_train_precomputed_tok_s", "jax_train_in_step_tok_s", "torch_train_tok_s",
                "jax_sample_tok_s", "torch_generate_tok_s", "jax_decode_hbm_gb_s"):
        assert rows[0][key] > 0, key


def test_bench_train_ratios_are_per_round_and_best_against_best():
    """bench_train's figures from hand-made runs: a slow round of the baseline must not flatter
    spin_jax's median, and the best-against-best ratio uses each side's fastest run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(ROOT, "bench", "bench_train.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tok_s = {("torch", 1): 10.0, ("torch", 2): 20.0, ("torch", 3): 10.0,
             ("jax-in_step", 1): 15.0, ("jax-in_step", 2): 50.0, ("jax-in_step", 3): 20.0,
             ("jax-precomputed", 1): 30.0, ("jax-precomputed", 2): 30.0, ("jax-precomputed", 3): 30.0}
    runs = [{"variant": v, "round": k, "tok_s": t, "step_s": 100.0 / t, "peak_rss_gib": k / 10}
            for (v, k), t in tok_s.items()]
    results, ratios = bench.summarize_runs(runs, 3)
    assert results["torch"]["tok_s"] == 20.0 and results["torch"]["peak_rss_gib"] == 0.3
    assert ratios["jax-in_step"]["per_round"] == [1.5, 2.5, 2.0] and ratios["jax-in_step"]["median"] == 2.0
    assert ratios["jax-in_step"]["best"] == 2.5
    assert ratios["jax-precomputed"]["per_round"] == [3.0, 1.5, 3.0] and ratios["jax-precomputed"]["median"] == 3.0
    assert ratios["jax-precomputed"]["best"] == 1.5


def test_test_files_run_slowest_first_by_the_committed_record_and_this_checkouts_times(monkeypatch, tmp_path):
    """make test's file order: the committed record of each file's seconds (a fresh clone), overridden
    by this checkout's last sessions (pytest's cache); files in neither (new ones) first; and the
    committed record parses (a broken one would be ignored in silence)."""
    import conftest

    record = tmp_path / "file_seconds.json"
    record.write_text(json.dumps({"tests/a.py": 10.0, "tests/b.py": 50.0, "tests/c.py": 30.0}))
    monkeypatch.setattr(conftest, "RECORDED_SECONDS", str(record))

    class Cache:
        def __init__(self, d):
            self.d = d

        def get(self, key, default):
            return self.d.get(key, default)

    files = ["tests/a.py", "tests/b.py", "tests/c.py", "tests/new.py"]
    assert conftest.slowest_first(files, conftest.file_seconds(None)) == ["tests/new.py", "tests/b.py", "tests/c.py",
                                                                          "tests/a.py"]
    here = Cache({conftest.FILE_SECONDS: {"tests/a.py": 99.0}})
    assert conftest.slowest_first(files, conftest.file_seconds(here)) == ["tests/new.py", "tests/a.py", "tests/b.py",
                                                                          "tests/c.py"]
    record.write_text("{not json")
    assert conftest.file_seconds(here) == {"tests/a.py": 99.0}
    with open(os.path.join(ROOT, "tests", "file_seconds.json")) as f:  # the committed record is read, not ignored
        committed = json.load(f)
    assert committed and all(k.startswith("tests/test_") and v > 0 for k, v in committed.items()), committed
