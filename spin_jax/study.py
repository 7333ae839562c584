"""`make study`: does SPIN beat more SFT at this scale? The paper's experiment on a CPU budget, with
the question, arms, metrics and decision rule fixed in docs/study.md before any result.

Arms, from one θ0 (SFT of model.name on the training prompts' conversations, `sft.run_sft`):

    spin   θ1 … θT: SPIN iterations 0 … T-1 (iterate.train_iteration), the paper's data mixing
    sft    S1 … ST: SFT continued from θ0, step k from S(k-1) with as many updates as SPIN iteration
           k-1 took, each a fresh run like a SPIN iteration (runs/<run>/sft_arm/step<k>/sft/model)

Every model answers the same held-out prompts (data.eval_split, no conversation shared with the
training split), and the study measures on them:

    primary    MAUVE between the held-out human responses and the model's answers, on features of a
               frozen model no arm trains (study.feature_model: mean-pooled final hidden states of
               each response after its prompt); one k-means quantization of every feature (human and
               all models'), then mauve-text's divergence-curve area per model
    secondary  the human responses' NLL per token; SPIN's reward margin and accuracy of human over
               fresh answers of the arm's previous model; ROUGE-L and chrF against the human
               response; length, share ending their turn, distinct-2 and repetition (rep-4);
               lm-eval tasks (study.tasks) with McNemar's test per pair

Uncertainty: a paired bootstrap over held-out prompts (study.bootstrap resamples) gives a 95%
interval for each model's metric and for each difference against θ0 and against the matched other
arm; distinct-2, a statistic of the whole set of answers, takes a delete-one jackknife instead
(value ± 1.96 standard errors). A double bootstrap from the held-out prompts checks how well the
rule's two MAUVE intervals cover (reported beside the decision). Each step writes its files and is
skipped when they exist: a killed study resumes; wall.json sums each step's seconds over invocations.
Outputs under runs/<run>/study/: heldout.jsonl, answers/, scores/, features/, tasks/, results.json,
study.md and the plots.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import statistics
import time
from typing import Callable, Optional, Sequence

import numpy as np

from spin_jax import rundir
from spin_jax.config import Config

log = logging.getLogger(__name__)

MAUVE_SEED = 25  # mauve-text's default k-means seed


# ----------------------------------------------------------------------------------------------
# Models of the study


def labels(cfg: Config) -> list[str]:
    T = cfg.study.iterations
    return ["theta0"] + [f"spin{k}" for k in range(1, T + 1)] + [f"sft{k}" for k in range(1, T + 1)]


def previous(label: str) -> Optional[str]:
    """The model an arm's step starts from (its reference for SPIN's reward): θ0 for step 1."""
    if label == "theta0":
        return None
    arm, k = re.match(r"(spin|sft)(\d+)$", label).groups()
    return "theta0" if int(k) == 1 else f"{arm}{int(k) - 1}"


def matched(label: str) -> Optional[str]:
    """The other arm's model at the same step (spin3 <-> sft3)."""
    m = re.match(r"(spin|sft)(\d+)$", label)
    if not m:
        return None
    return ("sft" if m.group(1) == "spin" else "spin") + m.group(2)


def step_of(label: str) -> int:
    return 0 if label == "theta0" else int(re.search(r"\d+$", label).group())


def study_dir(cfg: Config) -> str:
    return os.path.join(cfg.run_dir, "study")


def theta0_dir(cfg: Config) -> str:
    return os.path.join(cfg.sft_dir("base"), "model")


def arm_config(cfg: Config, k: int) -> Config:
    """The config of the SFT arm's step k: SFT of S(k-1) (θ0 for k = 1) into
    runs/<run>/sft_arm/step<k>/sft/model, on the same conversations with the same SFT settings."""
    start = theta0_dir(cfg) if k == 1 else model_path(cfg, f"sft{k - 1}")
    step = arm_config_dir(cfg, k)
    return dataclasses.replace(cfg, runs_dir=os.path.dirname(step), run_name=os.path.basename(step),
                               model=dataclasses.replace(cfg.model, name=start, init="base", revision=None))


def model_path(cfg: Config, label: str) -> str:
    if label == "theta0":
        return theta0_dir(cfg)
    k = step_of(label)
    if label.startswith("spin"):
        return rundir.model_dir(cfg.run_dir, k - 1)
    return os.path.join(arm_config_dir(cfg, k), "sft", "model")


def arm_config_dir(cfg: Config, k: int) -> str:
    """The run directory of the SFT arm's step k (its model: <it>/sft/model)."""
    return os.path.join(cfg.run_dir, "sft_arm", f"step{k}")


def spin_updates(cfg: Config, t: int) -> int:
    return int(rundir.read_or_rebuild_summary(cfg.run_dir, t)["steps"])


def train_arms(cfg: Config, progress: bool = True) -> dict:
    """θ0, the SPIN iterations and the SFT steps, each resumed or skipped when done. Returns the
    updates of each step."""
    from spin_jax import iterate, sft

    if cfg.model.init != "sft":
        raise ValueError("a study starts both arms from θ0 = SFT of model.name: set model.init: sft in its config")
    t0 = time.time()
    s0 = sft.run_sft(cfg, "base", progress=progress) or {}
    updates = {"theta0": s0.get("updates") or s0.get("steps")}
    for t in range(cfg.study.iterations):
        iterate.train_iteration(cfg, t, progress=progress)
        updates[f"spin{t + 1}"] = spin_updates(cfg, t)
    for k in range(1, cfg.study.iterations + 1):
        sft.run_sft(arm_config(cfg, k), "base", updates=updates[f"spin{k}"], progress=progress)
        updates[f"sft{k}"] = updates[f"spin{k}"]
    log.info(f"study: both arms trained ({time.time() - t0:.0f} s this run)")
    return updates


# ----------------------------------------------------------------------------------------------
# Held-out prompts


def heldout(cfg: Config, tokenizer) -> list[dict]:
    """The first study.num_heldout usable rows of data.eval_split, no conversation of which the
    training split holds; written once to study/heldout.jsonl and read back after."""
    from spin_jax.data import prompts

    path = os.path.join(study_dir(cfg), "heldout.jsonl")
    if os.path.exists(path):
        return _read_jsonl(path)
    d = cfg.data
    train_roots = {prompts.conversation_root(i) for i in prompts.split_ids(d, d.train_split)}
    rows = prompts.prompt_rows(d, d.eval_split, cfg.study.num_heldout, tokenizer, exclude_conversations=train_roots)
    if len(rows) < cfg.study.num_heldout:
        raise ValueError(f"{d.name} {d.eval_split}: only {len(rows)} usable held-out prompts, study.num_heldout is "
                         f"{cfg.study.num_heldout}; widen data.eval_split or lower study.num_heldout")
    rows = [{"id": r["id"], "prompt": r["prompt"], "response": r["response"]} for r in rows]
    os.makedirs(study_dir(cfg), exist_ok=True)
    rundir.write_jsonl(path, rows)
    return rows


# ----------------------------------------------------------------------------------------------
# Answers and scores


def answer_and_score(cfg: Config, rows: list[dict], progress: bool = True) -> None:
    """Each model's answers to the held-out prompts (one file per seed) and the log-probs the
    metrics need: of the human responses, of its reference's answers, and of its own answers where
    it is the next model's reference (SPIN's reward). One scoring and sampling program serves every
    model."""
    from spin_jax import evaluate, sharding
    from spin_jax.data import tokenize
    from spin_jax.io.load import load_model_for
    from spin_jax.sampling import SamplingParams

    out = study_dir(cfg)
    refs = {previous(lab) for lab in labels(cfg)}  # the models some other model's margin is measured against
    todo = [lab for lab in labels(cfg) if _missing(cfg, lab, lab in refs)]
    if not todo:
        return
    mesh = sharding.local_mesh_from_config(cfg.mesh)
    progs = None
    for label in labels(cfg):  # in order: a model's reference answers before it is scored on them
        if label not in todo:
            continue
        model = load_model_for(cfg.model, model_path(cfg, label))
        tok = model.tokenizer
        if progs is None:
            progs = evaluate.Programs(cfg, model.cfg, mesh, tok.pad_token_id or 0)
        sp = SamplingParams.from_config(cfg.sampling, tok)
        for seed in cfg.study.seeds:
            path = _answers_path(cfg, label, seed)
            if not os.path.exists(path):
                got = evaluate.sample(progs, model.params, tok, rows, sp, seed, progress, f"answers {label} s{seed}")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                rundir.write_jsonl(path, [dict(id=r["id"], **g) for r, g in zip(rows, got)])
        params = progs.place(model.params)
        prompts = [tokenize.prompt_ids(tok, r["prompt"]) for r in rows]

        def logps(texts, ended, desc, params=params, prompts=prompts, tok=tok):
            """Summed log-probs of each text as a response, its end-of-turn token included where it
            ended its turn (an answer cut at the token budget has none), as training scores them."""
            responses = [tokenize.response_ids(tok, t) if e else list(tok(t, add_special_tokens=False)["input_ids"])
                         for t, e in zip(texts, ended)]
            return progs.logps(params, prompts, responses, progress, desc).tolist(), [len(r) for r in responses]

        def answers_of(who, seed):
            got = _answers(cfg, who, seed)
            return [a["text"] for a in got], [a["finish_reason"] == "eos" for a in got]

        scores = _kept_scores(cfg, label)  # what an earlier run scored on the same answers is kept
        if "real_logp" not in scores:
            scores["real_logp"], scores["real_n"] = logps([r["response"] for r in rows], [True] * len(rows),
                                                          f"score {label} human")
        for kind, seed, who in _needed(cfg, label, label in refs):
            if str(seed) not in scores[kind]:
                scores[kind][str(seed)] = logps(*answers_of(who, seed), f"score {label} on {who}'s s{seed}")[0]
                scores["answers"][f"{who}.s{seed}"] = rundir.file_sha256(_answers_path(cfg, who, seed))
        os.makedirs(os.path.dirname(_scores_path(cfg, label)), exist_ok=True)
        rundir.write_json(_scores_path(cfg, label), scores)
        log.info(f"study: {label} answered and scored -> {out}")
        del model, params


def _needed(cfg: Config, label: str, is_ref: bool) -> list[tuple[str, int, str]]:
    """(kind, seed, whose answers) of every log-prob list label's scores must hold: its own answers
    where it is another model's reference, its reference's answers (SPIN's margin), each seed."""
    ref = previous(label)
    return ([("own", x, label) for x in cfg.study.seeds] if is_ref else []) + (
        [("ref", x, ref) for x in cfg.study.seeds] if ref is not None else [])


def _kept_scores(cfg: Config, label: str) -> dict:
    """label's scores file without the entries whose answers file changed or went since they were
    scored (a file from before the digests were kept is trusted: its digests are taken now)."""
    path = _scores_path(cfg, label)
    s = rundir.read_json(path) if os.path.exists(path) else {}
    kept = {"own": dict(s.get("own", {})), "ref": dict(s.get("ref", {})), "answers": dict(s.get("answers", {}))}
    if "real_logp" in s and "real_n" in s:
        kept["real_logp"], kept["real_n"] = s["real_logp"], s["real_n"]
    for kind, who in (("own", label), ("ref", previous(label))):
        for seed in list(kept[kind]):
            file = _answers_path(cfg, who, int(seed)) if who else ""
            key = f"{who}.s{seed}"
            if not os.path.exists(file):
                del kept[kind][seed]
            elif "answers" not in s:
                kept["answers"][key] = rundir.file_sha256(file)
            elif kept["answers"].get(key) != rundir.file_sha256(file):
                del kept[kind][seed]
    return kept


def _missing(cfg: Config, label: str, is_ref: bool) -> bool:
    """Whether label still lacks an answers file or a log-prob list the study needs now (a study
    given more seeds or iterations than it was scored with scores only what is new)."""
    if not all(os.path.exists(_answers_path(cfg, label, x)) for x in cfg.study.seeds):
        return True
    s = _kept_scores(cfg, label)
    return "real_logp" not in s or any(str(seed) not in s[kind] for kind, seed, _ in _needed(cfg, label, is_ref))


def _read_jsonl(path: str) -> list[dict]:
    """The study's held-out rows or a model's answers; a bad line is an error naming it."""
    return rundir.read_records(path, ("id",), "`spin-jax study`", "delete the file and rerun: it is written again")


def _answers_path(cfg: Config, label: str, seed: int) -> str:
    return os.path.join(study_dir(cfg), "answers", f"{label}.s{seed}.jsonl")


def _answers(cfg: Config, label: str, seed: int) -> list[dict]:
    return _read_jsonl(_answers_path(cfg, label, seed))


def _scores_path(cfg: Config, label: str) -> str:
    return os.path.join(study_dir(cfg), "scores", f"{label}.json")


# ----------------------------------------------------------------------------------------------
# Features for MAUVE


def features(cfg: Config, rows: list[dict], progress: bool = True) -> dict[str, np.ndarray]:
    """{"human": [N, D], "<label>.s<seed>": [N, D]}: study.feature_model's mean-pooled final hidden
    states over each response's tokens, after its prompt (plain text: prompt, a blank line, response)."""
    from spin_jax.io.load import load_model

    d = os.path.join(study_dir(cfg), "features")
    names = {"human": [r["response"] for r in rows]}
    for label in labels(cfg):
        for seed in cfg.study.seeds:
            names[f"{label}.s{seed}"] = [a["text"] for a in _answers(cfg, label, seed)]
    todo = [n for n in names if not os.path.exists(os.path.join(d, f"{n}.npy"))]
    if todo:
        model = load_model(cfg.study.feature_model)
        os.makedirs(d, exist_ok=True)
        pool = Pooler(model, cfg.study.feature_batch)
        for name in todo:
            feats = pool([r["prompt"] for r in rows], names[name], progress, f"features {name}")
            with rundir.atomic_file(os.path.join(d, f"{name}.npy")) as f:
                np.save(f, feats)
    return {n: np.load(os.path.join(d, f"{n}.npy")) for n in names}


class Pooler:
    """Mean of the final hidden states over a response's tokens, each after its prompt; batches of
    rows right-padded to a length bucket, one compiled program per bucket."""

    def __init__(self, model, batch_size: int, max_response: int = 256):
        import jax
        import jax.numpy as jnp

        from spin_jax.model import transformer

        self.model, self.batch_size, self.max_response = model, batch_size, max_response
        self.params = jax.tree.map(jnp.asarray, model.params)

        def pooled(params, tokens, valid, mask):
            h, _ = transformer.forward_hidden(params, model.cfg, tokens, valid=valid)
            m = mask[..., None].astype(jnp.float32)
            return jnp.sum(h.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)

        self.fn = jax.jit(pooled)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], progress: bool, desc: str) -> np.ndarray:
        from tqdm import tqdm

        from spin_jax.data import tokenize

        tok = self.model.tokenizer
        rows = []
        for p, r in zip(prompts, responses):
            pi = list(tok(p + "\n\n")["input_ids"])[-256:]
            ri = list(tok(r, add_special_tokens=False)["input_ids"])[:self.max_response]
            rows.append((pi, ri))
        out = []
        for start in tqdm(range(0, len(rows), self.batch_size), desc=desc, unit="batch", disable=not progress):
            batch = rows[start:start + self.batch_size]
            width = tokenize.bucket(max(len(p) + max(len(r), 1) for p, r in batch))
            n = self.batch_size
            tokens = np.zeros((n, width), np.int32)
            valid = np.zeros((n, width), bool)
            mask = np.zeros((n, width), bool)
            for i, (p, r) in enumerate(batch):
                seq = p + r
                tokens[i, :len(seq)], valid[i, :len(seq)] = seq, True
                if r:
                    mask[i, len(p):len(seq)] = True
                else:  # an empty answer: the position that would predict its first token
                    mask[i, len(p) - 1] = True
            got = np.asarray(self.fn(self.params, tokens, valid, mask))[:len(batch)]
            out.append(got)
        return np.concatenate(out).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Metrics (functions of held-out prompt indices, for the bootstrap)


WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of the texts' words (corpus level); 0 with no n-gram."""
    grams = [tuple(w[i:i + n]) for t in texts for w in [words(t)] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(text: str, n: int = 4) -> float:
    """rep-n of one text: the share of its word n-grams that repeat an earlier one (0 for none)."""
    w = words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


class GramIds:
    """Word bigrams as integer ids per text, so a corpus' distinct-2 over any subset of texts is one
    np.unique (the bootstrap's thousands of resamples)."""

    def __init__(self, texts: Sequence[str], n: int = 2):
        vocab: dict = {}
        self.ids = [np.asarray([vocab.setdefault(tuple(w[i:i + n]), len(vocab)) for i in range(len(w) - n + 1)],
                               np.int64) for w in map(words, texts)]

    def distinct(self, idx: np.ndarray) -> float:
        parts = [self.ids[i] for i in idx]
        total = sum(len(p) for p in parts)
        return len(np.unique(np.concatenate(parts))) / total if total else 0.0

    def leave_one_out(self) -> np.ndarray:
        """distinct-2 of the corpus without text i, for every i (the jackknife's replicates): a
        bigram leaves the distinct count when every occurrence of it is in text i."""
        lengths = np.array([len(x) for x in self.ids], np.int64)
        if not lengths.sum():
            return np.zeros(len(self.ids))
        counts = np.bincount(np.concatenate(self.ids))
        only_here = np.array([int(np.sum(c == counts[u])) for x in self.ids
                              for u, c in [np.unique(x, return_counts=True)]], np.int64)
        total = lengths.sum() - lengths
        return np.where(total > 0, (len(counts) - only_here) / np.maximum(total, 1), 0.0)  # every id occurs


def quantize(feats: dict[str, np.ndarray], buckets: int = 0, seed: int = MAUVE_SEED) -> tuple[dict, int]:
    """One quantization of every feature set, as mauve-text's cluster_feats quantizes a pair (l2
    norm, PCA to 90% of the variance, faiss k-means, 5 redos): {name: cluster label per row}."""
    import faiss
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import normalize

    names = list(feats)
    data = normalize(np.vstack([feats[n] for n in names]), norm="l2", axis=1)
    n_min = min(len(feats[n]) for n in names)
    k = buckets or max(2, int(round(n_min / 10)))
    pca = PCA(n_components=None, whiten=False, random_state=seed + 1).fit(data)
    keep = int(np.argmax(np.cumsum(pca.explained_variance_ratio_) >= 0.9)) + 1
    data = pca.transform(data)[:, :keep].astype(np.float32)
    km = faiss.Kmeans(data.shape[1], k, niter=500, verbose=False, nredo=5, update_index=True, seed=seed + 2)
    km.train(data)
    lab = km.index.search(data, 1)[1].reshape(-1)
    out, at = {}, 0
    for n in names:
        out[n] = lab[at:at + len(feats[n])]
        at += len(feats[n])
    return out, k


MAUVE_WEIGHTS = np.linspace(1e-6, 1 - 1e-6, 25)  # compute_mauve's divergence-curve points
MAUVE_SCALING = 5.0


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) over the last axis; inf where p has mass and q none (mauve-text's kl_multinomial)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0) / np.where(q > 0, q, 1.0)), 0.0)
    return np.where(((p > 0) & (q == 0)).any(-1), np.inf, terms.sum(-1))


def _area(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The trapezoid area under y(x) with the points ordered by x (sklearn's auc), over the last axis."""
    order = np.argsort(x, axis=-1, kind="stable")
    x, y = np.take_along_axis(x, order, -1), np.take_along_axis(y, order, -1)
    return np.sum(np.diff(x, axis=-1) * (y[..., 1:] + y[..., :-1]) / 2, axis=-1)


def mauve_of_histograms(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """MAUVE of cluster histograms p and q ([..., k], any leading shape): mauve-text's divergence
    curve (25 mixtures, scaling 5, its two extreme points) and the mean of its two areas, as
    compute_mauve takes them, for a whole batch of bootstrap resamples at once."""
    p = np.asarray(p, np.float64) / np.sum(p, -1, keepdims=True)
    q = np.asarray(q, np.float64) / np.sum(q, -1, keepdims=True)
    w = MAUVE_WEIGHTS[:, None]
    r = w * p[..., None, :] + (1 - w) * q[..., None, :]  # [..., 25, k]
    x = np.exp(-MAUVE_SCALING * _kl(q[..., None, :], r))
    y = np.exp(-MAUVE_SCALING * _kl(p[..., None, :], r))
    one, zero = np.ones(x.shape[:-1] + (1,)), np.zeros(x.shape[:-1] + (1,))
    x, y = np.concatenate([one, x, zero], -1), np.concatenate([zero, y, one], -1)
    return 0.5 * (_area(x, y) + _area(y, x))


def histograms(labels: np.ndarray, k: int) -> np.ndarray:
    """Cluster counts of each row of labels ([..., n] -> [..., k])."""
    labels = np.asarray(labels)
    rows = labels.reshape(-1, labels.shape[-1])
    flat = (rows + k * np.arange(len(rows))[:, None]).reshape(-1)
    return np.bincount(flat, minlength=k * len(rows)).reshape(labels.shape[:-1] + (k,)).astype(np.float64)


def mauve_from_labels(p: np.ndarray, q: np.ndarray, k: int) -> float:
    """MAUVE of two sets of cluster labels (mauve_of_histograms of their counts)."""
    return float(mauve_of_histograms(histograms(p, k), histograms(q, k)))


def mauve_of_answers(human: np.ndarray, labels, k: int, idx: np.ndarray) -> np.ndarray:
    """A model's MAUVE against the human responses on the prompts idx ([n], or [..., n] rows of
    prompt indices for a batch of resamples), the mean over seeds as the study takes it; labels are
    the answers' clusters, [seeds][N]."""
    h = histograms(human[idx], k)
    return np.mean([mauve_of_histograms(h, histograms(np.asarray(lab)[idx], k)) for lab in labels], axis=0)


def mauve_text(p: np.ndarray, q: np.ndarray, buckets: int = 0) -> float:
    """mauve-text's own compute_mauve on two feature sets (its k-means on the pair)."""
    import mauve

    return float(mauve.compute_mauve(p_features=p, q_features=q, num_buckets=buckets or "auto",
                                     seed=MAUVE_SEED).mauve)


@dataclasses.dataclass
class ModelData:
    """Per held-out prompt (seeds side by side) what a model's metrics are computed from."""
    label: str
    real_logp: np.ndarray  # [N]
    real_n: np.ndarray  # [N]
    margin: Optional[np.ndarray]  # [seeds, N] SPIN's reward margin against the arm's previous model
    labels: list[np.ndarray]  # [seeds][N] MAUVE cluster of each answer
    rouge: np.ndarray  # [seeds, N]
    chrf: np.ndarray  # [seeds, N]
    length: np.ndarray  # [seeds, N] answer tokens
    ends: np.ndarray  # [seeds, N] 1 where the answer ended its turn
    rep4: np.ndarray  # [seeds, N]
    grams: list[GramIds]


def metric_fns(human_labels: np.ndarray, k: int) -> dict[str, Callable]:
    """name -> f(ModelData, idx) for every per-model metric."""
    def mauve(m, idx):
        return float(mauve_of_answers(human_labels, m.labels, k, idx))

    def mean_over(attr):
        return lambda m, idx: float(np.mean(getattr(m, attr)[:, idx]))

    return {
        "mauve": mauve,
        "nll_per_token": lambda m, idx: float(-m.real_logp[idx].sum() / max(m.real_n[idx].sum(), 1)),
        "margin": lambda m, idx: float(np.mean(m.margin[:, idx])) if m.margin is not None else math.nan,
        "accuracy": lambda m, idx: float(np.mean(m.margin[:, idx] > 0)) if m.margin is not None else math.nan,
        "rouge_l": mean_over("rouge"),
        "chrf": mean_over("chrf"),
        "length": mean_over("length"),
        "ends_turn": mean_over("ends"),
        "distinct_2": lambda m, idx: float(np.mean([g.distinct(idx) for g in m.grams])),
        "rep_4": mean_over("rep4"),
    }


def jackknife_fns() -> dict[str, Callable]:
    """name -> f(ModelData): per held-out prompt, the metric without that prompt, for the metrics of
    the whole set of answers whose bootstrap is biased: a resample repeats answers and with them
    their bigrams, so distinct-2's replicates lie below its value."""
    return {"distinct_2": lambda m: np.mean([g.leave_one_out() for g in m.grams], axis=0)}


def jackknife_interval(value: float, loo: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """value ± z·se, se the jackknife's standard error from the leave-one-out replicates."""
    loo = np.asarray(loo, np.float64)
    n = len(loo)
    if n < 2:
        return (math.nan, math.nan)
    se = math.sqrt((n - 1) / n * float(np.sum((loo - loo.mean()) ** 2)))
    z = statistics.NormalDist().inv_cdf(1 - (1 - level) / 2)
    return value - z * se, value + z * se


CHECK_TRIALS = 200  # data sets in the double bootstrap that checks the rule's MAUVE intervals


def mauve_difference(human: np.ndarray, a: np.ndarray, b: np.ndarray, k: int, idx: np.ndarray) -> np.ndarray:
    """MAUVE(human, a) − MAUVE(human, b) on the prompts idx ([..., n] rows of prompt indices);
    a and b are [seeds, N] cluster labels (mauve_of_answers)."""
    return mauve_of_answers(human, a, k, idx) - mauve_of_answers(human, b, k, idx)


def check_mauve_interval(human: np.ndarray, a: np.ndarray, b: np.ndarray, k: int, resamples: int,
                         trials: int = CHECK_TRIALS, level: float = 0.95, seed: int = 0) -> dict:
    """A double bootstrap of the paired MAUVE difference the decision rule reads: the held-out
    prompts (each with its human and both models' clusters) are taken as the population, whose
    difference is known (the observed one); `trials` data sets of as many prompts are drawn from it,
    and each gets the study's interval (`resamples` paired resamples, percentile). Returns how often
    that interval covered the population's difference and the estimate's mean bias."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    n = len(human)
    truth = float(mauve_difference(human, a, b, k, np.arange(n)))
    rng = np.random.default_rng(seed)
    covered, estimates = 0, []
    for _ in range(trials):
        draw = rng.integers(0, n, n)
        h, x, y = human[draw], a[:, draw], b[:, draw]
        estimates.append(float(mauve_difference(h, x, y, k, np.arange(n))))
        lo, hi = interval(mauve_difference(h, x, y, k, rng.integers(0, n, (resamples, n))), level)
        covered += lo <= truth <= hi
    return {"difference": truth, "coverage": covered / trials, "bias": float(np.mean(estimates)) - truth,
            "trials": trials, "resamples": resamples, "level": level}


def bootstrap_indices(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates (NaNs left out)."""
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    if not len(v):
        return (math.nan, math.nan)
    a = (1 - level) / 2
    return float(np.quantile(v, a)), float(np.quantile(v, 1 - a))


def mcnemar(a: Sequence[float], b: Sequence[float]) -> dict:
    """McNemar's exact test on paired 0/1 outcomes: discordant counts and the two-sided p-value."""
    from scipy.stats import binomtest

    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    n01, n10 = int(np.sum(~a & b)), int(np.sum(a & ~b))
    p = float(binomtest(n10, n01 + n10, 0.5).pvalue) if n01 + n10 else 1.0
    return {"a_only": n10, "b_only": n01, "p": p}


# ----------------------------------------------------------------------------------------------
# Tasks


def run_tasks(cfg: Config, progress: bool = True) -> dict[str, dict]:
    """lm-eval's study.tasks (study.task_limit documents each) on every model: per task the
    metric, its standard error and each document's 0/1 outcome (for McNemar)."""
    from spin_jax import benchmark, sharding
    from spin_jax.io.load import load_model_for

    st = cfg.study
    if not st.tasks.strip():
        return {}
    d = os.path.join(study_dir(cfg), "tasks")
    names = benchmark.parse_tasks(st.tasks)
    tm = task_names = None
    out = {}
    for label in labels(cfg):
        path = os.path.join(d, f"{label}.json")
        if not os.path.exists(path):
            if tm is None:
                tm = benchmark.task_manager((), [n for n, _ in names], "auto")
                task_names, _, _ = benchmark.prepare_tasks(tm, names, "auto", benchmark.explicit_tasks(st.tasks))
            lm = benchmark.SpinLM(load_model_for(cfg.model, model_path(cfg, label)),
                                  mesh=sharding.local_mesh_from_config(cfg.mesh),
                                  batch_size=2 * cfg.sampling.batch_size, progress=progress)
            r = benchmark.evaluate_tasks(lm, tm, task_names, st.task_limit or None, log_samples=True)
            rec = {}
            for task, _ in task_names:
                metric, value, _ = benchmark.primary_metric(task, r)
                name = metric.split(",")[0]
                rec[task] = {"metric": metric, "value": value, "stderr": benchmark.stderr_of(task, metric, r),
                             "outcomes": [float(s[name]) for s in sorted(r["samples"][task],
                                                                        key=lambda s: s["doc_id"])]}
            os.makedirs(d, exist_ok=True)
            rundir.write_json(path, rec)
        out[label] = rundir.read_json(path)
    return out


# ----------------------------------------------------------------------------------------------
# Analysis


def load_models(cfg: Config, rows: list[dict], feats: dict[str, np.ndarray]) -> tuple[dict, np.ndarray, int]:
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    beta = cfg.train.beta
    qlabels, k = quantize(feats, cfg.study.mauve_buckets)
    scorer, chrf = rouge_scorer.RougeScorer(["rougeL"]), CHRF()
    models = {}
    for label in labels(cfg):
        s = rundir.read_json(_scores_path(cfg, label))
        seeds = [str(x) for x in cfg.study.seeds]
        answers = [_answers(cfg, label, int(x)) for x in seeds]
        margin = None
        ref = previous(label)
        if ref is not None:
            r = rundir.read_json(_scores_path(cfg, ref))
            real = beta * (np.asarray(s["real_logp"]) - np.asarray(r["real_logp"]))
            gen = [beta * (np.asarray(s["ref"][x]) - np.asarray(r["own"][x])) for x in seeds]
            margin = np.stack([real - g for g in gen])
        models[label] = ModelData(
            label=label, real_logp=np.asarray(s["real_logp"]), real_n=np.asarray(s["real_n"]),
            margin=margin, labels=[qlabels[f"{label}.s{x}"] for x in seeds],
            rouge=np.asarray([[scorer.score(row["response"], a["text"])["rougeL"].fmeasure
                               for row, a in zip(rows, ans)] for ans in answers]),
            chrf=np.asarray([[chrf.sentence_score(a["text"], [row["response"]]).score / 100
                              for row, a in zip(rows, ans)] for ans in answers]),
            length=np.asarray([[a["n_tokens"] for a in ans] for ans in answers], np.float64),
            ends=np.asarray([[a["finish_reason"] == "eos" for a in ans] for ans in answers], np.float64),
            rep4=np.asarray([[repetition(a["text"]) for a in ans] for ans in answers]),
            grams=[GramIds([a["text"] for a in ans]) for ans in answers])
    return models, qlabels["human"], k


def analyse(cfg: Config, rows: list[dict], feats: dict[str, np.ndarray], tasks: dict, updates: dict,
            progress: bool = True) -> dict:
    """Every metric per model with its bootstrap interval, every difference against θ0 and the
    matched model, the tasks with McNemar's tests, and the pre-registered decision."""
    from tqdm import tqdm

    models, human, k = load_models(cfg, rows, feats)
    fns, jack = metric_fns(human, k), jackknife_fns()
    n = len(rows)
    full = np.arange(n)
    idxs = bootstrap_indices(n, cfg.study.bootstrap, seed=cfg.data.seed)
    reps = {lab: {m: np.empty(len(idxs)) for m in fns if m not in jack} for lab in models}
    for b, idx in enumerate(tqdm(idxs, desc="bootstrap", unit="resample", disable=not progress)):
        for lab, md in models.items():
            for m in reps[lab]:
                reps[lab][m][b] = fns[m](md, idx)
    loo = {lab: {m: fn(md) for m, fn in jack.items()} for lab, md in models.items()}
    per_model = {lab: {m: {"value": fn(md, full)} for m, fn in fns.items()} for lab, md in models.items()}
    for lab in models:
        for m, rec in per_model[lab].items():
            rec["ci"] = jackknife_interval(rec["value"], loo[lab][m]) if m in jack else interval(reps[lab][m])
    for lab, md in models.items():  # mauve-text's own compute_mauve, per model against the human responses
        per_model[lab]["mauve_text"] = {"value": float(np.mean([
            mauve_text(feats["human"], feats[f"{lab}.s{x}"], cfg.study.mauve_buckets) for x in cfg.study.seeds])),
            "ci": (math.nan, math.nan)}
    pairs = comparisons(list(models))
    diffs = {}
    for lab, other in pairs:
        diffs[f"{lab} - {other}"] = d = {}
        for m in fns:
            value = per_model[lab][m]["value"] - per_model[other][m]["value"]
            d[m] = {"value": value, "ci": jackknife_interval(value, loo[lab][m] - loo[other][m]) if m in jack
                    else interval(reps[lab][m] - reps[other][m])}
    task_table = {}
    for lab, rec in tasks.items():
        for task, r in rec.items():
            row = task_table.setdefault(task, {"metric": r["metric"], "models": {}, "mcnemar": {}})
            row["models"][lab] = {"value": r["value"], "stderr": r["stderr"]}
    for task, row in task_table.items():
        for lab, other in pairs:
            if lab in tasks:
                row["mcnemar"][f"{lab} - {other}"] = mcnemar(tasks[lab][task]["outcomes"],
                                                              tasks[other][task]["outcomes"])
    result = {"models": per_model, "differences": diffs, "tasks": task_table, "updates": updates,
              "heldout": n, "seeds": list(cfg.study.seeds), "bootstrap": cfg.study.bootstrap, "mauve_buckets": k,
              "feature_model": cfg.study.feature_model}
    result["decision"] = decide(result, cfg.study.iterations)
    T = cfg.study.iterations
    result["mauve_check"] = {  # how well the rule's two intervals cover, from these prompts (reported, not used)
        f"spin{T} - {other}": check_mauve_interval(human, np.asarray(models[f"spin{T}"].labels),
                                                   np.asarray(models[other].labels), k, cfg.study.bootstrap,
                                                   seed=cfg.data.seed)
        for other in ("theta0", f"sft{T}")}
    return result


def comparisons(labs: Sequence[str]) -> list[tuple[str, str]]:
    """(model, against) pairs the study reports: every model against θ0, and each SPIN iterate
    against the SFT model with as many updates."""
    return [(lab, other) for lab in labs for other in ("theta0", matched(lab))
            if other is not None and other != lab and not (lab.startswith("sft") and other != "theta0")]


def decide(result: dict, T: int) -> dict:
    """The rule docs/study.md fixed before the run: SPIN has an effect at this scale if θT's MAUVE
    exceeds θ0's and S_T's with the 95% interval of both differences above 0, and θT has not
    collapsed (ends its turn no less than 10 points below θ0, distinct-2 at least 90% of θ0's,
    rep-4 at most 0.05 above θ0's). Harm: both intervals below 0."""
    d = result["differences"]
    vs0, vs_sft = d[f"spin{T} - theta0"]["mauve"], d[f"spin{T} - sft{T}"]["mauve"]
    m, z = result["models"][f"spin{T}"], result["models"]["theta0"]
    collapse = []
    if m["ends_turn"]["value"] < z["ends_turn"]["value"] - 0.10:
        collapse.append("ends its turn 10+ points less often than θ0")
    if m["distinct_2"]["value"] < 0.9 * z["distinct_2"]["value"]:
        collapse.append("distinct-2 below 90% of θ0's")
    if m["rep_4"]["value"] > z["rep_4"]["value"] + 0.05:
        collapse.append("rep-4 more than 0.05 above θ0's")
    above = vs0["ci"][0] > 0 and vs_sft["ci"][0] > 0
    below = vs0["ci"][1] < 0 and vs_sft["ci"][1] < 0
    verdict = ("effect" if above and not collapse else "harm" if below else "no effect shown")
    return {"verdict": verdict, "mauve_vs_theta0": vs0, "mauve_vs_sft": vs_sft, "collapse": collapse}


# ----------------------------------------------------------------------------------------------
# Output


NAMES = {"mauve": "MAUVE (primary)", "mauve_text": "MAUVE, mauve-text's own k-means", "nll_per_token":
         "human NLL / token", "margin": "SPIN margin vs previous", "accuracy": "SPIN accuracy vs previous",
         "rouge_l": "ROUGE-L", "chrf": "chrF", "length": "answer tokens", "ends_turn": "ends its turn",
         "distinct_2": "distinct-2", "rep_4": "rep-4"}
PLOT = "study_metrics.png"


def display(label: str) -> str:
    if label == "theta0":
        return "θ0"
    k = step_of(label)
    return f"θ{k} (SPIN)" if label.startswith("spin") else f"S{k} (SFT)"


def _fmt(v, ci=None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    s = f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    if ci and not any(isinstance(c, float) and math.isnan(c) for c in ci):
        s += f" [{ci[0]:.4f}, {ci[1]:.4f}]"
    return s


def _vc(d: dict) -> tuple:
    return d["value"], d["ci"]


def _check_lines(result: dict) -> list[str]:
    """The double bootstrap's check of the rule's two MAUVE intervals, in words."""
    checks = result.get("mauve_check") or {}
    if not checks:
        return []
    c = next(iter(checks.values()))
    parts = [f"{name.replace('spin', 'θ').replace('theta0', 'θ0').replace('sft', 'S')}: covered in "
             f"{v['coverage']:.1%}, the difference's mean bias {v['bias']:+.4f}" for name, v in checks.items()]
    return [f"Interval check (a double bootstrap: {c['trials']} data sets of {result['heldout']} prompts drawn from "
            f"these, each with its own {c['resamples']}-resample interval, against the difference measured here): "
            + "; ".join(parts) + f". Coverage near {c['level']:.0%} or above means the rule's intervals are not too "
            "narrow; a bias of the size of a difference means its point value overstates or understates it."]


def markdown(cfg: Config, result: dict, wall: dict) -> str:
    from spin_jax.report import table

    T = cfg.study.iterations
    dec = result["decision"]
    order = labels(cfg)
    metrics = ["mauve", "mauve_text", "nll_per_token", "margin", "accuracy", "rouge_l", "chrf", "length",
               "ends_turn", "distinct_2", "rep_4"]
    out = [f"# Study: SPIN against SFT — `{cfg.run_name}`", "",
           f"Pre-registered in docs/study.md. {result['heldout']} held-out prompts, sampling seeds "
           f"{result['seeds']}, {result['bootstrap']} paired bootstrap resamples over prompts (distinct-2: a "
           f"jackknife); MAUVE on {result['feature_model']} features, {result['mauve_buckets']} clusters. "
           "Brackets: 95% intervals.", "",
           "## Decision", "",
           f"**{dec['verdict']}**: MAUVE θ{T} − θ0 = {_fmt(*_vc(dec['mauve_vs_theta0']))}"
           f"; θ{T} − S{T} = {_fmt(*_vc(dec['mauve_vs_sft']))}"
           + (f"; collapse: {', '.join(dec['collapse'])}" if dec["collapse"] else "; no collapse") + ".", "",
           *_check_lines(result), "",
           "## Every model", "", f"![metrics]({PLOT})", ""]
    out += [table(["model", "updates", *[NAMES[m] for m in metrics]],
                  [[display(lab), str(result["updates"].get(lab, "—")),
                    *[_fmt(result["models"][lab][m]["value"], result["models"][lab][m]["ci"]) for m in metrics]]
                   for lab in order]), ""]
    out += ["## Differences", "", "Each model against θ0, and each SPIN iterate against the SFT model with as "
            "many updates from θ0:", ""]
    dm = [m for m in metrics if m != "mauve_text"]
    out += [table(["difference", *[NAMES[m] for m in dm]],
                  [[name.replace("theta0", "θ0"), *[_fmt(v[m]["value"], v[m]["ci"]) for m in dm]]
                   for name, v in result["differences"].items()]), ""]
    if result["tasks"]:
        out += ["## Tasks", "", "lm-eval, ± its standard error; McNemar's exact p-value of each pair below.", ""]
        tasks = list(result["tasks"])
        out += [table(["model", *tasks], [[display(lab), *[
            _fmt(result["tasks"][t]["models"].get(lab, {}).get("value")) + (
                f" ± {result['tasks'][t]['models'][lab]['stderr']:.4f}"
                if result["tasks"][t]["models"].get(lab, {}).get("stderr") is not None else "")
            for t in tasks]] for lab in order]), ""]
        pairs = sorted({p for t in tasks for p in result["tasks"][t]["mcnemar"]})
        out += [table(["pair", *tasks], [[p.replace("theta0", "θ0"), *[
            f"{result['tasks'][t]['mcnemar'][p]['p']:.3f}" if p in result["tasks"][t]["mcnemar"] else "—"
            for t in tasks]] for p in pairs]), ""]
    out += ["## Wall time", "", "Each step's seconds, summed over every invocation of the study.", "",
            table(["step", "seconds"], [[k, f"{v:.0f}"] for k, v in wall.items()]), ""]
    return "\n".join(out)


def plot(cfg: Config, result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = cfg.study.iterations
    metrics = ["mauve", "nll_per_token", "margin", "rouge_l", "chrf", "length", "ends_turn", "distinct_2", "rep_4"]
    fig, axes = plt.subplots(3, 3, figsize=(12, 9))
    for ax, m in zip(axes.ravel(), metrics):
        for arm, color in (("spin", "tab:blue"), ("sft", "tab:orange")):
            labs = ["theta0"] + [f"{arm}{k}" for k in range(1, T + 1)]
            v = np.asarray([result["models"][lab][m]["value"] for lab in labs], np.float64)
            lo = np.asarray([result["models"][lab][m]["ci"][0] for lab in labs], np.float64)
            hi = np.asarray([result["models"][lab][m]["ci"][1] for lab in labs], np.float64)
            x = np.arange(T + 1) + (0.05 if arm == "sft" else -0.05)
            # the point estimate may lie outside its percentile interval (a skewed statistic): bars from the interval
            yerr = [np.clip(np.nan_to_num(v - lo), 0, None), np.clip(np.nan_to_num(hi - v), 0, None)]
            ax.errorbar(x, v, yerr=yerr, marker="o", capsize=3,
                        color=color, label="SPIN θt" if arm == "spin" else "SFT St")
        ax.set_title(NAMES[m])
        ax.set_xticks(range(T + 1))
        ax.set_xlabel("iteration / SFT step")
    axes[0, 0].legend()
    fig.suptitle(f"{cfg.run_name}: both arms from θ0, 95% bootstrap intervals")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    with rundir.atomic_file(path) as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def add_wall(path: str, wall: dict) -> dict:
    """Each step's seconds summed over every invocation of the study (a resumed study's table shows
    what the whole study took, not only its last invocation), kept in path."""
    total = rundir.read_json(path) if os.path.exists(path) else {}
    total = {k: float(total.get(k, 0.0)) + float(wall.get(k, 0.0)) for k in dict.fromkeys([*total, *wall])}
    rundir.write_json(path, total)
    return total


def run_study(cfg: Config, progress: bool = True) -> dict:
    """Train both arms, answer, score, featurize, run the tasks, analyse; each part resumes."""
    from spin_jax.io.load import load_tokenizer

    wall = {}
    t = time.time()
    updates = train_arms(cfg, progress)
    wall["train both arms"] = time.time() - t
    rows = heldout(cfg, load_tokenizer(cfg.model.name, cfg.model.chat_template))
    t = time.time()
    answer_and_score(cfg, rows, progress)
    wall["answers and scores"] = time.time() - t
    t = time.time()
    feats = features(cfg, rows, progress)
    wall["features"] = time.time() - t
    t = time.time()
    tasks = run_tasks(cfg, progress)
    wall["tasks"] = time.time() - t
    t = time.time()
    result = analyse(cfg, rows, feats, tasks, updates, progress)
    wall["analysis"] = time.time() - t
    d = study_dir(cfg)
    wall = add_wall(os.path.join(d, "wall.json"), wall)
    rundir.write_json(os.path.join(d, "results.json"), result)
    plot(cfg, result, os.path.join(d, PLOT))
    text = markdown(cfg, result, wall)
    rundir.atomic_write(os.path.join(d, "study.md"), text)
    log.info(f"study: {result['decision']['verdict']} -> {os.path.join(d, 'study.md')}")
    return result

