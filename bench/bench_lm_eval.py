"""`spin-jax benchmark` vs `lm_eval --model hf` (lm-eval's own PyTorch model): wall time of the
same tasks on the same model and CPU, one run, each command timed whole (start-up, model load,
compile or not, scoring, metrics), best of --repeats.

The model is SmolLM2-135M-Instruct from the embedded GGUF, written once as an HF directory (fp32,
with spin_jax's tokenizer) that both commands load. spin_jax's second and later runs read their
compiled programs from the persistent compilation cache, as a user's rerun does; the first run,
which compiles, is reported apart.

    make bench-lm-eval                                  # the four local tasks
    python bench/bench_lm_eval.py --tasks spin_local_mc --num-fewshot 5 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS_DIR = os.path.join(ROOT, "spin_jax", "benchmark_tasks")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tasks", default="spin_local_mc,spin_local_ll,spin_local_rolling,spin_local_gen")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--num-fewshot", type=int, default=None, help="shots for every task (default: the tasks' 0)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each command after spin_jax's first")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench_lm_eval.")
    model_dir = os.path.join(work, "model")
    _run([sys.executable, "-c", "import sys; from spin_jax.io import hf; from spin_jax.io.load import load_model; "
          "m = load_model(sys.argv[1]); hf.export_hf_dir(m.params, m.cfg, sys.argv[2], m.tokenizer)",
          args.model, model_dir], {})
    env = {"SPIN_JAX_COMPILE_CACHE": os.path.join(work, "xla"), "TOKENIZERS_PARALLELISM": "false"}
    ours = [sys.executable, "-m", "spin_jax", "benchmark", "--model", model_dir, "--tasks", args.tasks,
            "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--no-progress"]
    theirs = [os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "hf", "--model_args",
              f"pretrained={model_dir},dtype=float32,max_length={args.max_length}", "--tasks", args.tasks,
              "--include_path", TASKS_DIR, "--batch_size", str(args.batch_size), "--device", "cpu"]
    if args.num_fewshot is not None:
        ours += ["--num-fewshot", str(args.num_fewshot)]
        theirs += ["--num_fewshot", str(args.num_fewshot)]
    first = _run(ours + ["--output", os.path.join(work, "ours_first.json")], env)
    t_ours = min(_run(ours + ["--output", os.path.join(work, f"ours{k}.json")], env) for k in range(args.repeats))
    t_hf = min(_run(theirs + ["--output_path", os.path.join(work, f"hf{k}")], env) for k in range(args.repeats))
    metrics = _compare(os.path.join(work, "ours0.json"), os.path.join(work, "hf0"))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.model} fp32, tasks "
          f"{args.tasks}, batch {args.batch_size}, max_length {args.max_length}, shots {args.num_fewshot or 0}")
    print(f"spin-jax benchmark: {t_ours:.1f}s (first run, compiling: {first:.1f}s)")
    print(f"lm_eval --model hf: {t_hf:.1f}s")
    print(f"ratio (lm_eval hf / spin-jax, warm cache): {t_hf / t_ours:.2f}x; first run {t_hf / first:.2f}x")
    for task, (a, b) in metrics.items():
        print(f"  {task}: spin_jax {a}  hf {b}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"spin_jax_s": t_ours, "spin_jax_first_s": first, "hf_s": t_hf, "metrics": metrics}, f, indent=1)


def _run(cmd, env) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def _compare(ours_json: str, hf_dir: str) -> dict:
    """Each task's metrics from both results files, side by side."""
    import glob

    hf_json = sorted(glob.glob(os.path.join(hf_dir, "**", "results_*.json"), recursive=True))[-1]
    a, b = json.load(open(ours_json))["results"], json.load(open(hf_json))["results"]
    out = {}
    for task in a:
        keys = [k for k in b[task] if "," in k and "_stderr" not in k]
        out[task] = ({k: round(a[task][k], 4) for k in keys}, {k: round(b[task][k], 4) for k in keys})
    return out


if __name__ == "__main__":
    main()
