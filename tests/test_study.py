"""`make study`'s statistics on known inputs (MAUVE, the bootstrap's coverage, distinct-n,
repetition, McNemar), its data split, and a whole tiny study on a tiny model that writes every
table and plot and resumes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from spin_jax import study
from spin_jax.data import prompts

pytest.importorskip("mauve")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mauve_of_a_sample_against_itself_is_near_1_and_of_disjoint_ones_far_below():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    far = rng.normal(size=(300, 16)) + np.r_[6.0, np.zeros(15)]  # another distribution
    labels, k = study.quantize({"p": a, "same": b, "far": far})
    assert k == 30
    same, apart = study.mauve_from_labels(labels["p"], labels["same"], k), study.mauve_from_labels(
        labels["p"], labels["far"], k)
    assert same > 0.9 and apart < 0.1, (same, apart)
    assert study.mauve_from_labels(labels["p"], labels["p"], k) == pytest.approx(1.0, abs=1e-6)
    # mauve-text's own compute_mauve agrees on both
    assert study.mauve_text(a, b) > 0.9 and study.mauve_text(a, far) < 0.1


def test_the_bootstrap_interval_covers_a_known_difference_at_its_rate():
    """Paired data with a known mean difference: the 95% percentile interval of the paired
    bootstrap covers it in about 95% of 300 simulated data sets."""
    rng = np.random.default_rng(1)
    n, delta, covered, trials = 80, 0.3, 0, 300
    for trial in range(trials):
        base = rng.normal(size=n)
        x, y = base + rng.normal(size=n) + delta, base + rng.normal(size=n)
        idx = study.bootstrap_indices(n, 1000, seed=trial)
        lo, hi = study.interval(x[idx].mean(axis=1) - y[idx].mean(axis=1))
        covered += lo <= delta <= hi
    assert 0.91 <= covered / trials <= 0.985, covered / trials


def test_mauve_of_histograms_is_mauve_texts_curve_and_area_for_a_whole_batch():
    """The study's vectorized MAUVE against mauve-text's get_divergence_curve_for_multinomials and
    sklearn's auc (compute_mauve's own steps), one pair at a time, empty clusters included."""
    import importlib

    from sklearn.metrics import auc

    curve_of = importlib.import_module("mauve.compute_mauve").get_divergence_curve_for_multinomials

    def reference(p, q):
        x, y = curve_of(p / p.sum(), q / q.sum(), np.linspace(1e-6, 1 - 1e-6, 25), 5).T
        i, j = np.argsort(x), np.argsort(y)
        return 0.5 * (auc(x[i], y[i]) + auc(y[j], x[j]))

    rng = np.random.default_rng(4)
    p = rng.integers(0, 6, size=(3, 5, 12)).astype(float)
    q = rng.integers(0, 6, size=(3, 5, 12)).astype(float)
    p[0, 0, :4] = 0  # clusters only one side has: an infinite KL on the curve
    got = study.mauve_of_histograms(p, q)
    assert got.shape == (3, 5)
    want = np.array([[reference(p[i, j], q[i, j]) for j in range(5)] for i in range(3)])
    assert np.allclose(got, want, rtol=0, atol=1e-12), np.abs(got - want).max()
    labels = rng.integers(0, 12, size=(2, 7, 40))
    assert np.array_equal(study.histograms(labels, 12)[1, 3], np.bincount(labels[1, 3], minlength=12))


def test_the_mauve_difference_interval_covers_the_population_difference():
    """The decision rule's interval: held-out prompts whose human, model-a and model-b clusters come
    from known distributions (b agrees with a on 30% of prompts, as answers to one prompt do), so
    the population's MAUVE difference is exact. The 95% paired percentile interval covers it in at
    least ~95% of 200 data sets of 150 prompts, with no difference and with one; and the double
    bootstrap `make study` reports from one data set measures that coverage too."""
    rng = np.random.default_rng(5)
    k, n, rho = 15, 150, 0.3
    p = rng.dirichlet(np.full(k, 2.0))
    qa = 0.8 * p + 0.2 * rng.dirichlet(np.full(k, 2.0))
    for qb in (qa, 0.5 * p + 0.5 * np.roll(p, 3)):
        rest = (qb - rho * qa) / (1 - rho)  # b's clusters when it does not copy a's: b's marginal is qb
        assert (rest >= 0).all()
        truth = study.mauve_of_histograms(p, qa) - study.mauve_of_histograms(p, qb)
        covered = 0
        for trial in range(200):
            h, a = rng.choice(k, n, p=p), rng.choice(k, n, p=qa)
            b = np.where(rng.random(n) < rho, a, rng.choice(k, n, p=rest))
            reps = study.mauve_difference(h, a[None], b[None], k, study.bootstrap_indices(n, 500, seed=trial))
            lo, hi = study.interval(reps)
            covered += lo <= truth <= hi
        assert 0.92 <= covered / 200, (truth, covered)
    check = study.check_mauve_interval(h, a, b, k, resamples=500, trials=100)
    assert check["difference"] == pytest.approx(study.mauve_from_labels(h, a, k) - study.mauve_from_labels(h, b, k))
    assert 0.85 <= check["coverage"] <= 1.0 and check["trials"] == 100


def test_distinct_n_repetition_and_mcnemar_on_hand_made_inputs():
    assert study.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert study.distinct_n(["a b", "a b"], 2) == 0.5 and study.distinct_n(["one"], 2) == 0.0
    assert study.repetition("a b c d a b c d") == pytest.approx(1 / 5)  # 5 four-grams, abcd twice
    assert study.repetition("the cat sat on the mat") == 0.0 and study.repetition("hi") == 0.0
    assert study.repetition("no no no no no no") == pytest.approx(2 / 3)
    ids = study.GramIds(["a b a b", "c d"])
    assert ids.distinct(np.array([0])) == pytest.approx(2 / 3) and ids.distinct(np.array([0, 1])) == 0.75
    assert ids.distinct(np.array([1, 1])) == 0.5  # a resample may draw a text twice
    r = study.mcnemar([1, 1, 1, 1, 0, 1], [0, 0, 0, 0, 0, 1])
    assert (r["a_only"], r["b_only"]) == (4, 0) and r["p"] == pytest.approx(0.125)
    assert study.mcnemar([1, 0], [1, 0])["p"] == 1.0


def test_distinct_2_jackknife_covers_its_expected_value_where_the_bootstrap_does_not():
    """distinct-2 of a corpus of 60 texts drawn from a Zipf vocabulary: the leave-one-out values
    equal distinct_n on the texts left (brute force), and the jackknife's 95% interval covers the
    statistic's expected value (from 2000 other corpora) in about 95% of 200 corpora, where the
    bootstrap's percentile interval, whose resamples repeat texts and their bigrams, misses it."""
    rng = np.random.default_rng(3)
    zipf = 1 / np.arange(1, 301)
    zipf /= zipf.sum()

    def corpus(n=60):
        return [" ".join(f"w{i}" for i in rng.choice(300, size=rng.integers(4, 30), p=zipf)) for _ in range(n)]

    texts = corpus()
    ids = study.GramIds(texts)
    loo = ids.leave_one_out()
    assert np.allclose(loo[[0, 7, 59]], [study.distinct_n(texts[:i] + texts[i + 1:]) for i in (0, 7, 59)])
    expected = np.mean([study.GramIds(corpus()).distinct(np.arange(60)) for _ in range(2000)])
    jack = boot = 0
    for trial in range(200):
        ids = study.GramIds(corpus())
        value = ids.distinct(np.arange(60))
        lo, hi = study.jackknife_interval(value, ids.leave_one_out())
        jack += lo <= expected <= hi
        reps = [ids.distinct(idx) for idx in study.bootstrap_indices(60, 200, seed=trial)]
        lo, hi = study.interval(np.array(reps))
        boot += lo <= expected <= hi
    assert 0.90 <= jack / 200 <= 0.99 and boot / 200 < 0.5, (jack, boot)


def test_arms_steps_and_conversations():
    assert prompts.conversation_root("QWJhYvA_12") == "QWJhYvA" and prompts.conversation_root("x1") == "x1"
    assert [study.previous(x) for x in ("spin1", "spin3", "sft2", "theta0")] == ["theta0", "spin2", "sft1", None]
    assert study.matched("spin2") == "sft2" and study.matched("sft3") == "spin3" and study.matched("theta0") is None



def test_a_model_is_scored_again_only_where_the_study_needs_log_probs_its_file_lacks(tmp_path):
    """Scores are kept per model with a digest of the answers each list scored: a study given more
    seeds or iterations than they were written with, or whose answers changed, scores again only
    what is new or stale; the last model of an arm (nobody's reference) needs no own-answer scores."""
    from spin_jax import rundir
    from spin_jax.config import load_config

    def config(seeds):
        return load_config("configs/tiny_test.yaml", [f"runs_dir={tmp_path}", "study.iterations=2",
                                                      f"study.seeds={seeds}"])

    cfg = config("[0]")
    os.makedirs(os.path.join(study.study_dir(cfg), "answers"))
    for label in ("theta0", "spin1", "spin2"):
        rundir.write_jsonl(study._answers_path(cfg, label, 0), [{"id": "a", "text": label, "finish_reason": "eos"}])
    os.makedirs(os.path.join(study.study_dir(cfg), "scores"))

    def write(label, own, ref):  # as written before the digests were kept
        rundir.write_json(study._scores_path(cfg, label), {"real_logp": [-1.0], "real_n": [1], "own": {
            x: [-2.0] for x in own}, "ref": {x: [-3.0] for x in ref}})

    write("theta0", ["0"], [])
    write("spin1", ["0"], ["0"])
    write("spin2", [], ["0"])
    assert not study._missing(cfg, "theta0", True) and not study._missing(cfg, "spin1", True)
    assert not study._missing(cfg, "spin2", False) and study._missing(cfg, "spin2", True)
    assert study._missing(cfg, "sft1", True)  # neither answers nor scores
    assert study._needed(cfg, "spin2", False) == [("ref", 0, "spin1")]
    rundir.write_json(study._scores_path(cfg, "spin1"), study._kept_scores(cfg, "spin1"))  # digests kept now
    rundir.write_jsonl(study._answers_path(cfg, "theta0", 0), [{"id": "a", "text": "new", "finish_reason": "eos"}])
    kept = study._kept_scores(cfg, "spin1")
    assert kept["ref"] == {} and kept["own"] == {"0": [-2.0]} and kept["real_logp"] == [-1.0]
    assert study._missing(cfg, "spin1", True)  # θ0's answers changed: spin1's margin on them is stale
    assert all(study._missing(config("[0,1]"), lab, lab != "spin2") for lab in ("theta0", "spin1", "spin2"))


def cli(args, quiet=True):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "spin_jax", *args, *(["--no-progress"] if quiet else [])],
                          cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)


def test_a_tiny_study_writes_every_table_and_plot_and_resumes(tiny_model_dir, tmp_path):
    sets = [f"runs_dir={tmp_path}", f"model.name={tiny_model_dir}", "model.init=sft", "data.max_length=96",
            "data.complete_responses=true", "data.num_prompts=16", "sampling.max_new_tokens=8", "train.epochs=1",
            "sft.global_batch_size=8", "study.iterations=2", "study.num_heldout=12",
            f"study.feature_model={tiny_model_dir}", "study.tasks=spin_local_mc", "study.task_limit=4",
            "study.bootstrap=100", "study.mauve_buckets=4"]
    args = ["study", "--config", "configs/tiny_test.yaml", *[x for s in sets for x in ("--set", s)]]
    p = cli(args)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    d = tmp_path / "tiny" / "study"
    for name in ("study.md", "study_metrics.png", "results.json", "heldout.jsonl"):
        assert (d / name).exists(), name
    r = json.loads((d / "results.json").read_text())
    labels = ["theta0", "spin1", "spin2", "sft1", "sft2"]
    assert sorted(r["models"]) == sorted(labels)
    assert r["updates"]["sft1"] == r["updates"]["spin1"] and r["updates"]["sft2"] == r["updates"]["spin2"]
    for lab in labels:
        m = r["models"][lab]
        assert 0 <= m["mauve"]["value"] <= 1 and m["mauve"]["ci"][0] <= m["mauve"]["ci"][1]
        assert m["nll_per_token"]["value"] > 0
        assert (m["margin"]["value"] == m["margin"]["value"]) == (lab != "theta0")  # NaN for θ0 only
    assert {"spin2 - theta0", "spin2 - sft2", "sft1 - theta0"} <= set(r["differences"])
    assert r["decision"]["verdict"] in ("effect", "no effect shown", "harm")
    check = r["mauve_check"]["spin2 - theta0"]
    assert set(r["mauve_check"]) == {"spin2 - theta0", "spin2 - sft2"} and 0 <= check["coverage"] <= 1
    assert check["difference"] == pytest.approx(r["differences"]["spin2 - theta0"]["mauve"]["value"])
    last = json.loads((d / "scores" / "spin2.json").read_text())  # nobody's reference: own answers not scored
    assert last["own"] == {} and set(json.loads((d / "scores" / "spin1.json").read_text())["own"]) == {"0"}
    wall = json.loads((d / "wall.json").read_text())
    assert set(wall) == {"train both arms", "answers and scores", "features", "tasks", "analysis"}
    assert set(r["tasks"]["spin_local_mc"]["models"]) == set(labels)
    text = (d / "study.md").read_text()
    assert "## Decision" in text and "Interval check" in text and "McNemar" in text
    assert "θ2 (SPIN)" in text and "S2 (SFT)" in text
    # the held-out prompts share no conversation with the training split, and every human response fits
    held = [json.loads(x) for x in (d / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == 12
    from spin_jax.config import load_config
    from spin_jax.data import tokenize
    from spin_jax.io.load import load_tokenizer

    cfg = load_config("configs/tiny_test.yaml", sets)
    train_roots = {prompts.conversation_root(i) for i in prompts.split_ids(cfg.data, cfg.data.train_split)}
    assert not {prompts.conversation_root(h["id"]) for h in held} & train_roots
    tok = load_tokenizer(tiny_model_dir)
    assert all(len(tokenize.response_ids(tok, h["response"])) <= 96 - 48 for h in held)
    # the run's report carries the study's section and plot
    p = cli(["report", "--run", str(tmp_path / "tiny")], quiet=False)
    assert p.returncode == 0, p.stderr
    rep = (tmp_path / "tiny" / "report" / "report.md").read_text()
    assert "## Study: SPIN against SFT" in rep and "### Decision" in rep
    assert (tmp_path / "tiny" / "report" / "study_metrics.png").exists()
    # a rerun trains, answers and featurizes nothing again
    stamp = {f: os.path.getmtime(f) for f in (d / "answers").iterdir()}
    p = cli(args)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "already done" in p.stderr and "already trained" in p.stderr
    assert {f: os.path.getmtime(f) for f in (d / "answers").iterdir()} == stamp
    again = json.loads((d / "results.json").read_text())
    assert json.dumps(again["models"]) == json.dumps(r["models"])  # NaN (θ0's margin) compares as text
    summed = json.loads((d / "wall.json").read_text())  # the wall-time table sums both invocations
    assert summed["analysis"] > wall["analysis"] and all(summed[k] >= wall[k] for k in wall)
