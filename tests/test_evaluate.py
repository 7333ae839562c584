"""`evaluate`, `benchmark`, `report` and `export` end to end, through the CLI, on a tiny random model
trained for two SPIN iterations with W&B tracking in offline mode: held-out metrics land in
eval.jsonl, lm-eval scores in benchmarks.jsonl, the report renders its PNGs and tables, W&B's files
hold the run, and the exported trained iteration gives transformers' PyTorch model our logits."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from spin_jax import rundir
from spin_jax.data.store import SyntheticStore
from spin_jax.io import hf
from spin_jax.io.load import load_tokenizer
from spin_jax.model import transformer
from spin_jax.model.config import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/tiny_test.yaml"  # beta 0.1, 4 held-out prompts, max_new_tokens 8
SPIN_KEYS = {"loss", "rewards/real", "rewards/generated", "rewards/margins", "rewards/accuracies",
             "logps/real", "logps/generated"}
MODEL_KEYS = {"path", "logp_per_token", "logp_sum_mean", "gen_len_mean", "gen_len_median", "gen_len_max",
              "eos_share"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two SPIN iterations of a random 2-layer Llama (SmolLM2's tokenizer), then `evaluate` of both
    iterations (run side by side, as two users might)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    tok = load_tokenizer("smollm2-135m-instruct")
    cfg = tiny_config("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_heads=2,
                      num_kv_heads=1, tie_embeddings=True)
    params = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(0)))
    model = str(tmp / "model")
    hf.export_hf_dir(params, cfg, model, tok)
    sets = ["--set", f"model.name={model}", "--set", f"data.data_dir={tmp / 'tfds'}",
            "--set", f"runs_dir={tmp / 'runs'}", "--set", "run_name=r", "--set", "tracking.wandb.project=spin-test"]
    fast = ["--set", "train.epochs=1", "--set", "train.checkpoint_every=1000"]  # 2 + 4 updates, one checkpoint each
    run_ok(["spin", "--config", CONFIG, "--iters", "2", *sets, *fast])
    procs = [cli(["evaluate", "--config", CONFIG, "--iter", str(t), *sets]) for t in (0, 1)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
    bench = ["benchmark", "--config", CONFIG, "--iter", "1", "--tasks", "spin_local_mc,spin_local_gen", "--limit",
             "8", "--max-length", "64", *sets]
    first, again = run_ok(bench), run_ok(bench)  # the second finds every model and task done
    return {"base": model, "sets": sets, "run_dir": str(tmp / "runs" / "r"), "tmp": tmp, "bench": (first, again)}


def test_evaluate_appends_finite_heldout_metrics_for_every_model(run):
    records = sorted(read_jsonl(os.path.join(run["run_dir"], "eval.jsonl")), key=lambda r: r["iteration"])
    assert [r["iteration"] for r in records] == [0, 1]
    for rec in records:
        t = rec["iteration"]
        assert {"time", "wall_seconds", "settings", "spin", "models", "num_prompts", "model", "opponent"} <= set(rec)
        assert rec["num_prompts"] == 4 and rec["settings"]["eval_split"] == "train[95%:]"
        assert rec["settings"]["sampling"]["max_new_tokens"] == 8 and "seed" in rec["settings"]["sampling"]
        assert set(rec["spin"]) == SPIN_KEYS
        assert all(math.isfinite(v) for v in rec["spin"].values()), rec["spin"]
        assert 0.0 <= rec["spin"]["rewards/accuracies"] <= 1.0
        assert list(rec["models"]) == ["base"] + [f"iter{k}" for k in range(t + 1)]
        for label, m in rec["models"].items():
            assert set(m) == MODEL_KEYS, label
            assert all(math.isfinite(m[k]) for k in MODEL_KEYS - {"path"}), (label, m)
            assert m["logp_per_token"] < 0 and 0 <= m["eos_share"] <= 1
            assert m["gen_len_median"] <= m["gen_len_max"] <= 8
        # Two code paths agree: the SPIN pairs (scored as training scores them) and the per-model
        # real-response scores. With prompts <= 48 tokens and samples <= 9, a sample never changes
        # the truncation of a 64-token pair, so the real sides hold the same tokens.
        pol, opp = rec["models"][f"iter{t}"], rec["models"]["base" if t == 0 else f"iter{t - 1}"]
        assert rec["spin"]["logps/real"] == pytest.approx(pol["logp_sum_mean"], rel=1e-5)
        assert rec["spin"]["rewards/real"] == pytest.approx(
            0.1 * (pol["logp_sum_mean"] - opp["logp_sum_mean"]), rel=1e-3, abs=1e-4)
    # the base model's samples are the same in both evaluations (one fixed seed)
    s0, s1 = (read_jsonl(os.path.join(run["run_dir"], f"iter{t}", "eval_samples.jsonl")) for t in (0, 1))
    assert len(s1) == 4 and all(set(r["responses"]) == {"base", "iter0", "iter1"} for r in s1)
    assert [r["responses"]["base"]["text"] for r in s0] == [r["responses"]["base"]["text"] for r in s1]
    # held out: no evaluation prompt was a training prompt
    trained = set(SyntheticStore(os.path.join(run["run_dir"], "iter0", "synthetic")).expected_ids())
    assert trained and not trained & {r["id"] for r in s1}


def test_benchmark_scores_each_model_and_task_once(run):
    records = rundir.read_benchmarks(os.path.join(run["run_dir"], "benchmarks.jsonl"))
    assert sorted((r["label"], r["task"]) for r in records) == sorted(
        (m, t) for m in ("base", "iter0", "iter1") for t in ("spin_local_mc", "spin_local_gen"))
    for r in records:
        assert r["iteration"] == {"base": None, "iter0": 0, "iter1": 1}[r["label"]]
        assert r["limit"] == 8 and r["n_samples"][r["task"]]["effective"] == 8
        metric = {"spin_local_mc": "acc_norm,none", "spin_local_gen": "exact_match,first-number"}
        assert r["metric"] == metric[r["task"]]
        assert 0.0 <= r["value"] <= 1.0 and r["results"][r["task"]][r["metric"]] == r["value"]
    first, again = run["bench"]
    assert "| base |" in first and "every task is already in" in again
    assert again.count("every task is already in") == 3


def test_wandb_offline_files_hold_config_updates_summaries_evaluations_benchmarks_and_samples(run):
    from tests.wandb_files import digest

    run_id = json.load(open(os.path.join(run["run_dir"], "wandb.json")))["id"]
    runs = digest(run["run_dir"])["runs"]
    # one W&B run, continued by each command: train iter0, train iter1, 2 x evaluate, 2 x benchmark
    assert len(runs) == 6 and {r["id"] for r in runs} == {run_id}
    assert all(r["config"]["model"]["name"] == run["base"] for r in runs)
    rows = [row for r in runs for row in r["history"]]
    updates = [row for row in rows if "loss" in row]
    metrics = [json.loads(line) for t in (0, 1)
               for line in open(os.path.join(run["run_dir"], f"iter{t}", "metrics.jsonl"))]
    assert len(updates) == len(metrics) == 6  # 2 + 4 updates, metrics.jsonl's names and values
    for row, m in zip(updates, metrics):
        assert {k: row[k] for k in m} == pytest.approx(m)
    assert [row["global_step"] for row in updates] == [1, 2, 3, 4, 5, 6]
    assert [row["iteration"] for row in rows if "iteration/steps" in row] == [0, 1]
    assert sorted(row["iteration"] for row in rows if "eval/loss" in row) == [0, 1]
    assert {"eval/" + k for k in SPIN_KEYS} <= {k for row in rows for k in row}
    bench = sorted((row["theta"], k) for row in rows for k in row if k.startswith("benchmark/spin_local"))
    assert bench == sorted((th, f"benchmark/{t}") for th in (0, 1, 2) for t in ("spin_local_mc", "spin_local_gen"))
    tables = {k: v for r in runs for k, v in r["tables"].items()}
    assert {"samples/iter0", "samples/iter1", "eval/models_iter0", "eval/models_iter1",
            "benchmark/table"} <= set(tables)
    samples = tables["samples/iter0"]
    assert samples["columns"] == ["id", "prompt", "real", "generated"] and len(samples["data"]) == 16
    store = {r["id"]: r for r in SyntheticStore(os.path.join(run["run_dir"], "iter0", "synthetic")).rows()}
    for row in samples["data"]:
        assert [store[row[0]][k] for k in ("prompt", "real", "generated")] == row[1:]
    assert len(tables["benchmark/table"]["data"]) == 6
    summary = {k: v for r in runs for k, v in r["summary"].items()}
    assert summary["iter1/steps"] == 4 and "benchmark/iter1/spin_local_mc/acc_norm,none" in summary


def test_a_wandb_that_cannot_start_is_one_warning_and_training_goes_on(tmp_path):
    import subprocess

    out = str(tmp_path / "runs")
    env = dict(os.environ, WANDB_MODE="bogus-mode", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    p = subprocess.run([sys.executable, "-c", (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from spin_jax import tracking\nfrom spin_jax.config import load_config\n"
        f"cfg = load_config('{CONFIG}', ['tracking.wandb.project=p', 'runs_dir={out}'])\n"
        "with tracking.start(cfg, 'train iter0') as tr:\n"
        "    tr.update(0, 1, {'loss': 0.5}); print('ON' if tr.on else 'OFF')")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "OFF"
    warnings = [line for line in p.stderr.splitlines() if "W&B did not start" in line]
    assert len(warnings) == 1 and "Traceback" not in p.stderr, p.stderr


def test_evaluate_of_an_untrained_iteration_names_the_train_command(run):
    p = cli(["evaluate", "--config", CONFIG, "--iter", "2", *run["sets"]])
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 1 and "make train ITER=2" in out, out


def test_report_renders_markdown_and_pngs_of_the_expected_size(run):
    import matplotlib.image as mpimg

    out_dir = str(run["tmp"] / "report")
    p = cli(["report", "--run", run["run_dir"], "--out", out_dir], progress_flag=False)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    md = open(os.path.join(out_dir, "report.md"), encoding="utf-8").read()
    for png in ("train_curves.png", "heldout.png", "benchmarks.png"):
        assert f"]({png})" in md  # relative link: the directory reads offline
        path = os.path.join(out_dir, png)
        assert os.path.getsize(path) > 10_000
        img = mpimg.imread(path)
        assert img.shape[:2] == (700, 1200), (png, img.shape)
        assert img[..., :3].std() > 0.05  # not a blank canvas
    for t in (0, 1):  # data hashes, settings, wall times
        assert SyntheticStore(os.path.join(run["run_dir"], f"iter{t}", "synthetic")).digest() in md
    assert "`train.beta`" in md and "`data.eval_split`" in md
    assert "| iter1 (θ2 vs θ1) | 4 |" in md
    bench = md[md.index("## Benchmarks"):]
    head = "| model | spin_local_mc (acc_norm, 0-shot) | spin_local_gen (exact_match, 0-shot) | average |"
    assert head in bench and "a --limit of their documents" in bench
    records = rundir.read_benchmarks(os.path.join(run["run_dir"], "benchmarks.jsonl"))
    value = {(r["label"], r["task"]): (r["value"], r["stderr"]) for r in records}
    for label in ("base", "iter0", "iter1"):  # each model's row: value ± lm-eval's stderr, the average of the two
        (mc, mc_se), (gen, gen_se) = value[(label, "spin_local_mc")], value[(label, "spin_local_gen")]
        assert f"| {label} | {mc:.4f} ± {mc_se:.4f} | {gen:.4f} ± {gen_se:.4f} | {(mc + gen) / 2:.4f} |" in bench


def test_export_of_a_trained_iteration_gives_transformers_our_logits(run):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out_dir = str(run["tmp"] / "export")
    p = cli(["export", "--config", CONFIG, "--iter", "1", "--out", out_dir, *run["sets"]], progress_flag=False)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    trained = os.path.join(run["run_dir"], "iter1", "model")
    base = load_file(os.path.join(run["base"], "model.safetensors"))
    it1 = load_file(os.path.join(trained, "model.safetensors"))
    assert any(not np.array_equal(base[k], it1[k]) for k in base)  # really a trained iteration
    cfg, params = hf.read_hf_dir(trained)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 12))
    ours, _ = transformer.forward(params, cfg, tokens)
    m = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = m(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(ours, np.float64)
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-4
    card = open(os.path.join(out_dir, "README.md")).read()
    assert f"`{run['base']}`" in card and "iteration 1" in card and "`sharegpt`" in card and "beta 0.1" in card
    assert "lm_eval --model hf" in card
    p = cli(["export", "--config", CONFIG, "--iter", "1", "--out", out_dir, *run["sets"]], progress_flag=False)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 2 and "not empty" in out, out  # never overwrites (a usage error: nothing ran)
    from spin_jax.config import load_config
    from spin_jax.evaluate import export_iteration

    cfg = load_config(CONFIG, [a for a in run["sets"] if a != "--set"])
    half = export_iteration(cfg, 1, str(run["tmp"] / "export_bf16"), dtype="bfloat16")
    assert json.load(open(os.path.join(half, "config.json")))["dtype"] == "bfloat16"
    size = lambda d: os.path.getsize(os.path.join(d, "model.safetensors"))  # noqa: E731
    assert size(half) < 0.6 * size(out_dir)


def test_report_keeps_a_resumed_steps_last_values_and_refuses_a_run_without_iterations(tmp_path):
    from spin_jax import report

    with pytest.raises(FileNotFoundError, match="make train ITER=0"):
        report.write_report(str(tmp_path))
    it0 = tmp_path / "iter0"
    it0.mkdir()
    rows = [dict(step=s, loss=v, **{k: 0.0 for k in report.TRAIN_KEYS[1:]}) for s, v in
            [(1, 0.7), (2, 0.9), (2, 0.6), (3, 0.5)]]  # step 2 redone after a resume
    # a line torn by a kill, then the resumed run's lines after it: the torn line is skipped
    (it0 / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + '{"step": 3, "lo\n'
                                       + "".join(json.dumps(r) + "\n" for r in rows[2:]) + '{"step": 4, "lo')
    assert [m["loss"] for m in rundir.read_metrics(str(it0 / "metrics.jsonl"))] == [0.7, 0.6, 0.5]
    md = open(report.write_report(str(tmp_path)), encoding="utf-8").read()
    assert "(unfinished, 3 updates so far)" in md and "No eval.jsonl yet" in md


# ----------------------------------------------------------------------------------------------
# helpers


def cli(args, progress_flag=True):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.Popen([sys.executable, "-m", "spin_jax", *args, *(["--no-progress"] if progress_flag else [])],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_ok(args):
    p = cli(args)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return out


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
