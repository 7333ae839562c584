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
