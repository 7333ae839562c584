"""JAX's persistent compilation cache on this machine: a second `spin-jax score` loads every program
the first one compiled (none is compiled again, none is rejected by the CPU AOT loader's machine
check, jax#38445), and the loaded programs give the compiled ones' scores bit for bit."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# `spin-jax` with JAX's compiler logging each cache hit and miss to stderr
LOGGED_CLI = ("import logging, sys; log = logging.getLogger('jax._src.compiler'); log.setLevel(logging.DEBUG); "
              "log.addHandler(logging.StreamHandler()); from spin_jax.cli import main; main(sys.argv[1:])")


def score(model_dir, rows, out, cache):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               SPIN_JAX_COMPILE_CACHE=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    p = subprocess.run([sys.executable, "-c", LOGGED_CLI, "score", "--model", model_dir, "--input", rows,
                        "--output", out], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stderr


def test_second_run_loads_every_program_from_the_cache(tiny_model_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": "An answer " * i}) + "\n"
                            for i in range(1, 6)))
    cache = str(tmp_path / "xla")  # private: this test counts its own hits and misses
    first = score(tiny_model_dir, str(rows), str(tmp_path / "a.jsonl"), cache)
    second = score(tiny_model_dir, str(rows), str(tmp_path / "b.jsonl"), cache)
    misses = first.count("PERSISTENT COMPILATION CACHE MISS")
    assert misses > 0 and "Persistent compilation cache hit" not in first, first[-3000:]
    assert "Target machine feature" not in second, second[-3000:]  # entries rejected on load (jax#38445)
    assert second.count("PERSISTENT COMPILATION CACHE MISS") == 0, second[-3000:]
    assert second.count("Persistent compilation cache hit") == misses, second[-3000:]
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
