"""`spin-jax benchmark` vs `lm_eval --model hf` (lm-eval's own PyTorch model): wall time of the
same tasks on the same model and CPU, each command timed whole (start-up, model load, compile or
not, scoring, metrics).

The model is SmolLM2-135M-Instruct from the embedded GGUF, written once as an HF directory (fp32,
with spin_jax's tokenizer) that both commands load. After one untimed spin_jax run that fills a
compilation cache, each of --repeats rounds times three commands in turn: spin_jax with empty
compilation and tokenizer caches of its own (cold: it compiles and builds its tokenizer, as a user's
first run does), spin_jax reading the filled caches (warm: a user's rerun), and lm-eval. Taking them
in turn spreads the machine's drift over all three; the figures are the medians over rounds (and the
best of each), the ratios those of the medians.

    make bench-lm-eval                                  # the four local tasks
    python bench/bench_lm_eval.py --tasks spin_local_mc --num-fewshot 5 --repeats 2
    python bench/bench_lm_eval.py --tasks small_lm --data offline --limit 100 --repeats 1

With --data offline the tasks read the copies that ship on PyPI (spin_jax.benchmark_data), which
the `lm_eval` command cannot be pointed at: the baseline is then lm-eval's HFLM driven through
lm-eval's Python API (`simple_evaluate`, one HFLM for every task) on the same task manager, in a
process timed whole as the command is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (spin_jax cold, spin_jax warm, lm-eval)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--data", default=None, choices=("offline",), help="the tasks' packaged copies (see above)")
    ap.add_argument("--limit", type=float, default=None, help="documents per task (per subtask for a group)")
    ap.add_argument("--hf-worker", nargs=2, metavar=("MODEL_DIR", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_worker:
        return hf_worker(args)
    work = tempfile.mkdtemp(prefix="bench_lm_eval.")
    model_dir = os.path.join(work, "model")
    _run([sys.executable, "-c", "import sys; from spin_jax.io import hf; from spin_jax.io.load import load_model; "
          "m = load_model(sys.argv[1]); hf.export_hf_dir(m.params, m.cfg, sys.argv[2], m.tokenizer)",
          args.model, model_dir], {})
    env = {"SPIN_JAX_COMPILE_CACHE": os.path.join(work, "xla"), "SPIN_JAX_TOKENIZER_CACHE": os.path.join(work, "tok"),
           "TOKENIZERS_PARALLELISM": "false"}
    ours = [sys.executable, "-m", "spin_jax", "benchmark", "--model", model_dir, "--tasks", args.tasks,
            "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--no-progress"]
    theirs = [os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "hf", "--model_args",
              f"pretrained={model_dir},dtype=float32,max_length={args.max_length}", "--tasks", args.tasks,
              "--include_path", TASKS_DIR, "--batch_size", str(args.batch_size), "--device", "cpu"]
    if args.num_fewshot is not None:
        ours += ["--num-fewshot", str(args.num_fewshot)]
        theirs += ["--num_fewshot", str(args.num_fewshot)]
    if args.limit is not None:
        ours += ["--limit", str(args.limit)]
        theirs += ["--limit", str(args.limit)]
    out_flag = "--output_path"
    if args.data:
        ours += ["--data", args.data]
        theirs = [sys.executable, os.path.abspath(__file__), "--tasks", args.tasks, "--data", args.data,
                  "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
        theirs += ["--limit", str(args.limit)] if args.limit is not None else []
        theirs += ["--num-fewshot", str(args.num_fewshot)] if args.num_fewshot is not None else []
        theirs += ["--hf-worker", model_dir]
        out_flag = None
    _run(ours + ["--output", os.path.join(work, "ours_fill.json")], env)  # fills the warm cache
    cold, warm, theirs_s = [], [], []
    for k in range(args.repeats):
        cold_env = {**env, "SPIN_JAX_COMPILE_CACHE": os.path.join(work, f"xla-cold{k}"),
                    "SPIN_JAX_TOKENIZER_CACHE": os.path.join(work, f"tok-cold{k}")}
        cold.append(_run(ours + ["--output", os.path.join(work, f"ours_cold{k}.json")], cold_env))
        warm.append(_run(ours + ["--output", os.path.join(work, f"ours{k}.json")], env))
        theirs_s.append(_run(theirs + ([out_flag] if out_flag else []) + [os.path.join(work, f"hf{k}")], env))
    t_ours, t_cold, t_hf = (statistics.median(x) for x in (warm, cold, theirs_s))
    metrics = _compare(os.path.join(work, "ours0.json"), os.path.join(work, "hf0"))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.model} fp32, tasks "
          f"{args.tasks}, batch {args.batch_size}, max_length {args.max_length}, shots {args.num_fewshot or 0}")
    print(f"{args.repeats} rounds, medians (best):")
    print(f"spin-jax benchmark: warm cache {t_ours:.1f}s ({min(warm):.1f}s), empty cache {t_cold:.1f}s "
          f"({min(cold):.1f}s)")
    print(f"{'lm-eval HFLM (Python API)' if args.data else 'lm_eval --model hf'}: {t_hf:.1f}s ({min(theirs_s):.1f}s)")
    print(f"ratio (lm-eval / spin-jax): warm cache {t_hf / t_ours:.2f}x, empty cache {t_hf / t_cold:.2f}x")
    for task, (a, b) in metrics.items():
        print(f"  {task}: spin_jax {a}  hf {b}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"spin_jax_s": t_ours, "spin_jax_first_s": t_cold, "hf_s": t_hf, "runs": {
                "warm": warm, "cold": cold, "hf": theirs_s}, "metrics": metrics}, f, indent=1)


def _run(cmd, env) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def _compare(ours_json: str, hf_dir: str) -> dict:
    """Each task's metrics from both results files, side by side."""
    import glob

    hf_json = hf_dir if os.path.isfile(hf_dir) else sorted(
        glob.glob(os.path.join(hf_dir, "**", "results_*.json"), recursive=True))[-1]
    a, b = json.load(open(ours_json))["results"], json.load(open(hf_json))["results"]
    out = {}
    for task in a:
        keys = [k for k in b[task] if "," in k and "_stderr" not in k]
        out[task] = ({k: round(a[task][k], 4) for k in keys}, {k: round(b[task][k], 4) for k in keys})
    return out


def hf_worker(args) -> None:
    """lm-eval's HFLM on the packaged tasks: the task manager spin-jax benchmark --data offline builds."""
    import torch
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    from spin_jax import benchmark

    model_dir, out = args.hf_worker
    tasks = benchmark.parse_tasks(args.tasks, args.num_fewshot)
    tm = benchmark.task_manager((), [t for t, _ in tasks], args.data)
    tasks, _, _ = benchmark.prepare_tasks(tm, tasks, args.data, benchmark.explicit_tasks(args.tasks))
    lm = HFLM(pretrained=model_dir, dtype=torch.float32, max_length=args.max_length, batch_size=args.batch_size,
              device="cpu")
    limit = None if args.limit is None else int(args.limit) if args.limit >= 1 else args.limit
    results = {}
    for task, shots in tasks:
        r = evaluator.simple_evaluate(model=lm, tasks=[task], num_fewshot=shots, limit=limit, task_manager=tm,
                                      verbosity="ERROR")
        results.update(r["results"])
    with open(out, "w") as f:
        json.dump({"results": results}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
