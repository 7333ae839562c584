"""`spin-jax benchmark` against lm-evaluation-harness's own HF model (`HFLM`, PyTorch): the same
requests give the same log-likelihoods, is_greedy flags, greedy generations and task metrics, on
the four local tasks (multiple choice, loglikelihood, loglikelihood_rolling, generate_until)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from spin_jax import benchmark, report, sharding

torch = pytest.importorskip("torch")

TASKS = [t for t, _ in benchmark.PRESETS["spin_local"]]


@pytest.fixture(scope="module")
def tm():
    return benchmark.task_manager()


def evaluate(lm, tm, limit=None):
    return benchmark.evaluate_tasks(lm, tm, [(t, 0) for t in TASKS], limit=limit, log_samples=True)


def hflm(torch_model, tokenizer, max_length):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=torch_model, tokenizer=tokenizer, batch_size=8, max_length=max_length, device="cpu")


def parity(ours: dict, ref: dict, tasks=TASKS) -> dict:
    """Per task: worst log-likelihood difference (relative; absolute for log-likelihoods within 1 nat
    of 0, where a float32 rounding of 1e-5 is a large share), is_greedy agreement, identical greedy
    generations, and the metrics side by side."""
    table = {}
    for task in tasks:
        a, b = ours["samples"][task], ref["samples"][task]
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b] and a
        worst, greedy, same_gen = 0.0, [0, 0], [0, 0]
        for sa, sb in zip(a, b):
            assert sa["arguments"] == sb["arguments"]  # the same requests
            for ra, rb in zip(sa["resps"], sb["resps"]):
                ra, rb = ra[0], rb[0]
                if isinstance(rb, str):
                    same_gen[0] += ra == rb
                    same_gen[1] += 1
                    continue
                if isinstance(rb, (tuple, list)):
                    greedy[0] += bool(ra[1]) == bool(rb[1])
                    greedy[1] += 1
                    ra, rb = ra[0], rb[0]
                worst = max(worst, abs(ra - rb) / max(abs(rb), 1.0))
        metrics = {k: (v, ours["results"][task][k]) for k, v in ref["results"][task].items()
                   if "," in k and "_stderr" not in k}
        table[task] = {"worst_rel": worst, "is_greedy": greedy, "generations": same_gen, "metrics": metrics}
    print(json.dumps(table, indent=1, default=float))
    return table


def check(table: dict, local=True):
    for task, row in table.items():
        assert row["worst_rel"] < 1e-4, (task, row)
        assert row["is_greedy"][0] == row["is_greedy"][1], (task, row)
        assert row["generations"][0] == row["generations"][1], (task, row)
        for name, (ref, ours) in row["metrics"].items():
            if name.startswith(("acc", "exact_match")):
                assert ours == ref, (task, name, ours, ref)
            else:  # perplexities: sums of the log-likelihoods above
                assert ours == pytest.approx(ref, rel=1e-4), (task, name, ours, ref)
    if not local:
        return
    assert table["spin_local_gen"]["generations"][1] == 16
    assert table["spin_local_mc"]["is_greedy"][1] == 96


def test_tiny_model_matches_hflm_with_contexts_cut_to_the_model_length(tiny_model_dir, tm):
    """A random 2-layer Llama with a 24-token context: loglikelihood and generate_until requests are
    cut from the left and the rolling windows are many, as HFLM cuts them."""
    from transformers import AutoModelForCausalLM

    from spin_jax.io.load import load_model

    model = load_model(tiny_model_dir)
    lm = benchmark.SpinLM(model, batch_size=8, max_length=24, progress=False)
    ours = evaluate(lm, tm)
    assert lm.truncated > 0
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    check(parity(ours, evaluate(hflm(ref_model, model.tokenizer, 24), tm)))


def test_smollm2_matches_hflm_on_every_request_type(smollm2, tm, tmp_path):
    """The real SmolLM2-135M-Instruct, its weights as an HF directory that transformers loads (the
    GGUF's dequantization is checked against transformers' own in test_model_parity), with our
    tokenizer, which pre-tokenizes digits as SmolLM2 does, given to both."""
    from transformers import AutoModelForCausalLM

    from spin_jax.io import hf

    hf.export_hf_dir(smollm2.params, smollm2.cfg, str(tmp_path / "smollm2"), smollm2.tokenizer)
    ref_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "smollm2"), dtype=torch.float32).eval()
    lm = benchmark.SpinLM(smollm2, mesh=sharding.make_local_mesh(devices=jax.devices()[:1]), batch_size=8,
                          max_length=512, progress=False)  # 8 devices = 1: the next test
    ours = evaluate(lm, tm)
    table = parity(ours, evaluate(hflm(ref_model, smollm2.tokenizer, 512), tm))
    check(table)
    # a real model answers some of the sums and picks some of the right choices
    assert table["spin_local_gen"]["metrics"]["exact_match,first-number"][0] > 0
    assert table["spin_local_mc"]["metrics"]["acc,none"][0] > 0.25


def test_chat_template_requests_match_hflm(tiny_model_dir, tm):
    """--apply-chat-template: the same rendered requests (SmolLM2's ChatML with its system turn) and
    the same answers as HFLM's."""
    from transformers import AutoModelForCausalLM

    from spin_jax.io.load import load_model

    model = load_model(tiny_model_dir)
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tasks = [("spin_local_mc", 0), ("spin_local_gen", 0)]
    ours, ref = (benchmark.evaluate_tasks(lm, tm, tasks, limit=4, apply_chat_template=True, log_samples=True)
                 for lm in (benchmark.SpinLM(model, batch_size=8, max_length=128, progress=False),
                            hflm(ref_model, model.tokenizer, 128)))
    for task, _ in tasks:
        for sa, sb in zip(ours["samples"][task], ref["samples"][task]):
            assert sa["arguments"] == sb["arguments"] and "<|im_start|>assistant\n" in sa["arguments"][0][0]
            for ra, rb in zip(sa["resps"], sb["resps"]):
                ra, rb = ra[0], rb[0]
                if isinstance(rb, str):
                    assert ra == rb
                else:
                    assert ra[1] == rb[1] and ra[0] == pytest.approx(rb[0], rel=1e-4)


def test_sharded_over_8_devices_gives_the_one_device_numbers(tiny_model_dir, tm):
    from spin_jax.io.load import load_model

    assert len(jax.devices()) == 8
    model = load_model(tiny_model_dir)
    one = benchmark.SpinLM(model, mesh=sharding.make_local_mesh(devices=jax.devices()[:1]), batch_size=8,
                           max_length=48, progress=False)
    eight = benchmark.SpinLM(model, mesh=sharding.make_local_mesh(data=4, tensor=2), batch_size=8, max_length=48,
                             progress=False)
    a, b = evaluate(one, tm, limit=8), evaluate(eight, tm, limit=8)
    for task in TASKS:
        for sa, sb in zip(a["samples"][task], b["samples"][task]):
            for ra, rb in zip(sa["resps"], sb["resps"]):
                ra, rb = ra[0], rb[0]
                if isinstance(ra, str):
                    assert ra == rb
                elif isinstance(ra, (tuple, list)):
                    assert ra[1] == rb[1] and ra[0] == pytest.approx(rb[0], rel=1e-5, abs=1e-5)
                else:
                    assert ra == pytest.approx(rb, rel=1e-5)
        assert a["results"][task].keys() == b["results"][task].keys()


def test_presets_and_task_names(tm):
    assert benchmark.parse_tasks("open_llm") == [("arc_challenge", 25), ("hellaswag", 10), ("truthfulqa_mc2", 0),
                                                 ("mmlu", 5), ("winogrande", 5), ("gsm8k", 5)]
    assert benchmark.parse_tasks("spin_local_mc,gsm8k", num_fewshot=3) == [("spin_local_mc", 3), ("gsm8k", 3)]
    with pytest.raises(benchmark.UsageError, match="did you mean spin_local_mc"):
        benchmark.check_tasks(tm, ["spin_local_mcc"])


def cli(args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "spin_jax", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=600)


# the CLI, saying at exit whether the process imported torch
TORCH_WATCHED_CLI = ("import atexit, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules)); "
                     "from spin_jax.cli import main; main(sys.argv[1:])")


def test_cli_writes_lm_eval_results_json(tiny_model_dir, tmp_path):
    from spin_jax.io import tokenizer

    tokenizer.tokenizer_from_hf_dir(tiny_model_dir)  # kept: the CLI below reads it (a first read imports torch)
    out = tmp_path / "out.json"
    p = subprocess.run([sys.executable, "-c", TORCH_WATCHED_CLI, "benchmark", "--model", tiny_model_dir, "--tasks",
                        "spin_local_mc,spin_local_gen", "--limit", "4", "--max-length", "64", "--log-samples",
                        "--output", str(out), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "torch imported: False" in p.stdout  # a JAX model: lm-eval's torch seeding and collect_env skipped
    r = json.loads(out.read_text())
    # lm_eval --output_path's keys
    assert {"results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config", "task_hashes",
            "model_name", "lm_eval_version", "total_evaluation_time_seconds", "pretty_env_info",
            "transformers_version", "upper_git_hash"} <= set(r)
    assert r["config"]["torch_seed"] is None and f"jax version: {jax.__version__}" in r["pretty_env_info"]
    assert set(r["results"]) == {"spin_local_mc", "spin_local_gen"}
    assert r["n-samples"]["spin_local_mc"]["effective"] == 4
    assert "acc,none" in r["results"]["spin_local_mc"]
    rows = [json.loads(line) for line in (tmp_path / "out.samples.spin_local_gen.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and isinstance(rows[0]["resps"][0][0], str)
    assert "spin_local_mc" in p.stdout and "acc_norm" in p.stdout  # lm-eval's table


def test_environment_info_has_lm_evals_keys_is_collected_once_and_given_to_every_task(monkeypatch):
    """In place of lm-eval's add_env_info (torch's collect_env: torch imported, some 40 subprocesses),
    the JAX environment, with the keys lm-eval's adds, computed once however many tasks are evaluated
    one at a time; every later call gets the same keys and values."""
    import types

    from lm_eval.loggers.utils import add_env_info

    theirs: dict = {}
    add_env_info(theirs)
    calls, original = [], benchmark.jax_env_info
    monkeypatch.setattr(benchmark, "jax_env_info", lambda: calls.append(1) or original())
    fake = types.SimpleNamespace(add_env_info=add_env_info)
    benchmark._env_info_once(fake)
    benchmark._env_info_once(fake)  # a second evaluate_tasks in the process wraps nothing again
    results = [{"results": {}} for _ in range(3)]
    for r in results:
        fake.add_env_info(r)
    assert len(calls) == 1
    assert all(r == results[0] for r in results) and set(results[0]) == {"results", *theirs}
    ours = results[0]
    for key in ("transformers_version", "lm_eval_version", "upper_git_hash"):
        assert ours[key] == theirs[key], key
    info = ours["pretty_env_info"]
    assert f"jax version: {jax.__version__}" in info and f"{len(jax.devices())} device(s)" in info, info


def test_data_that_cannot_be_fetched_is_one_line_naming_task_data_set_and_the_fix(tiny_model_dir, tmp_path):
    p = cli(["benchmark", "--model", tiny_model_dir, "--tasks", "arc_challenge,spin_local_mc", "--data", "hub",
             "--output", str(tmp_path / "o.json")],
            env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache"),
                 "HF_HOME": str(tmp_path / "hf")})
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    line = next(x for x in p.stderr.splitlines() if x.strip().startswith("arc_challenge:"))
    assert "allenai/ai2_arc" in line and "HF_DATASETS_CACHE" in line and "--include-path" in line
    assert "spin_local_mc:" not in p.stderr  # the local task's data loads
    assert not (tmp_path / "o.json").exists()
    p = cli(["benchmark", "--model", tiny_model_dir, "--tasks", "no_such_task", "--output", str(tmp_path / "o.json")])
    assert p.returncode == 2 and "unknown lm-eval task 'no_such_task'" in p.stderr


def test_rows_and_average_of_the_benchmark_table():
    recs = [{"label": "iter0", "iteration": 0, "task": "a", "metric": "acc,none", "value": 0.5,
             "higher_is_better": True},
            {"label": "base", "iteration": None, "task": "a", "metric": "acc,none", "value": 0.25,
             "higher_is_better": True},
            {"label": "base", "iteration": None, "task": "ppl", "metric": "word_perplexity,none", "value": 9.0,
             "higher_is_better": False},
            {"label": "iter0", "iteration": 0, "task": "a", "metric": "acc,none", "value": 0.75,
             "higher_is_better": True}]
    columns, rows = report.benchmark_table(recs)
    assert columns == ["a", "ppl"] and [r[0] for r in rows] == ["base", "iter0"]
    assert rows[1][2]["a"]["value"] == 0.75  # the latest record of a pair
    assert report.average(rows[0][2]) == 0.25  # perplexity (lower is better) is not averaged
    assert np.isclose(report.average(rows[1][2]), 0.75)
