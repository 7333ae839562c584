"""Held-out evaluation of a SPIN run, and export of an iteration for external benchmarks.

`evaluate(cfg, t)` scores θ(t+1) = runs/<run>/iter<t>/model against its opponent θt on the
held-out prompts (config data.eval_split, the first data.num_eval_prompts usable ones):

    spin      SPIN's loss and metrics (rewards/real, rewards/generated, rewards/margins,
              rewards/accuracies, logps/*) of θ(t+1) vs θt on pairs (held-out real response,
              response freshly sampled by θt with the config's sampling params and a fixed seed),
              encoded exactly as training encodes them
    models    for every model so far (base or sft = θ0, iter0 = θ1, ..., iter<t> = θ(t+1); beside them
              the base when θ0 is its SFT, and sft_from_iter<k>, the SFT baselines): the mean
              per-token log-prob of the held-out real responses, and the length statistics of its
              own samples (mean, median, max n_tokens, see sampling.Sample; share that ended with
              end-of-turn rather than at max_new_tokens)

It writes runs/<run>/iter<t>/eval_samples.jsonl (one row per prompt: the real response and each
model's sample) and appends one JSON line to runs/<run>/eval.jsonl. Only process 0 writes.

`export_iteration(cfg, t, out)` writes iteration t's model as an HF directory with a model card,
for lm-eval-harness, MT-Bench (FastChat) and other tools that take transformers checkpoints.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import time
from typing import Optional

import jax
import numpy as np

from spin_jax import loss as loss_lib
from spin_jax import rundir, scoring, sharding, tracking
from spin_jax.config import Config
from spin_jax.data import examples as ex
from spin_jax.data import store as store_lib
from spin_jax.data import tokenize
from spin_jax.data.prompts import prompt_rows
from spin_jax.errors import UsageError
from spin_jax.io.load import load_model, load_model_for
from spin_jax.model import transformer
from spin_jax.sampling import Sampler, SamplingParams, derive_seed, progress_bar

log = logging.getLogger(__name__)


def evaluate(cfg: Config, t: int, progress: bool = True) -> dict:
    """Evaluate iteration t (θ(t+1) against θt) on the held-out prompts; returns the eval.jsonl record."""
    sharding.maybe_initialize_distributed(cfg.distributed)
    t_start = time.time()
    sft_dir = cfg.sft_dir() if cfg.model.init == "sft" else None
    specs = rundir.model_specs(cfg.model.name, cfg.run_dir, t, sft_dir)  # [(label, path)] θ0 .. θ(t+1)
    side = rundir.side_models(cfg.model.name, cfg.run_dir, t, sft_dir)  # the base beside its SFT, SFT baselines
    if jax.process_index() == 0:  # where the results go can be written, before any work
        rundir.check_output_file(os.path.join(cfg.run_dir, rundir.EVAL), "the run directory's eval.jsonl")
        rundir.check_output_file(os.path.join(cfg.iter_dir(t), rundir.EVAL_SAMPLES), "eval_samples.jsonl")
    mesh = sharding.local_mesh_from_config(cfg.mesh)  # every host evaluates on its own devices; host 0 writes
    sp = None
    seed = derive_seed(cfg.sampling.seed, "eval")  # one seed for every model and every evaluation
    rows, samples, per_model, progs = None, {}, {}, None
    spin_logps = {}  # "opponent" / "policy" -> [N, 2] (logp real, logp generated) of the held-out pairs
    for k, (label, path) in enumerate(specs + side):  # k indexes θk for k <= t + 1
        model = load_model_for(cfg.model, path)
        tok = model.tokenizer
        if rows is None:  # the tokenizer is the same for every model of a run
            rows = heldout_rows(cfg, t, tok)
            sp = SamplingParams.from_config(cfg.sampling, tok)
            real_enc = ex.encode_rows(tok, [{"id": r["id"], "prompt": r["prompt"], "real": r["response"],
                                             "generated": ""} for r in rows], cfg.data.max_length,
                                      cfg.data.max_prompt_length, source=f"{cfg.data.name} {cfg.data.eval_split}")
        if progs is None or progs.model_cfg != model.cfg:  # compiled once for all models of a run
            progs = Programs(cfg, model.cfg, mesh, tok.pad_token_id or 0)
        log.info(f"evaluate iteration {t}: {label} = {path} on {len(rows)} held-out prompts")
        params = progs.place(model.params)
        samples[label] = sample(progs, params, tok, rows, sp, seed, progress, desc=f"sample {label}")
        real_logps = progs.logps(params, [e.prompt for e in real_enc], [e.real for e in real_enc], progress,
                                 desc=f"score {label}")
        per_model[label] = dict(path=path, **model_stats(real_logps, [len(e.real) for e in real_enc],
                                                          samples[label]))
        if k == t:  # θt, the opponent: its samples are the generated side of the held-out pairs
            pairs = ex.encode_rows(tok, [{"id": r["id"], "prompt": r["prompt"], "real": r["response"],
                                          "generated": s["text"]} for r, s in zip(rows, samples[label])],
                                   cfg.data.max_length, cfg.data.max_prompt_length, source="held-out pairs")
        if k in (t, t + 1):  # the pairs under the opponent θt and the main player θ(t+1)
            spin_logps["opponent" if k == t else "policy"] = progs.pair_logps(params, pairs, progress,
                                                                              desc=f"score pairs {label}")
        del model, params
    pol, opp = spin_logps["policy"], spin_logps["opponent"]
    losses, metrics = loss_lib.spin_loss(pol[:, 0], pol[:, 1], opp[:, 0], opp[:, 1], cfg.train.beta,
                                         cfg.train.loss_type)
    spin = {"loss": float(np.mean(losses)), **{key: float(np.mean(v)) for key, v in metrics.items()}}
    record = {
        "iteration": t,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": time.time() - t_start,
        "model": specs[t + 1][1], "opponent": specs[t][1],
        "num_prompts": len(rows), "prompt_ids_sha256": rundir.ids_digest([r["id"] for r in rows]),
        "settings": settings(cfg, sp, seed),
        "spin": spin,
        "models": per_model,
        "samples": os.path.join(cfg.iter_dir(t), rundir.EVAL_SAMPLES),
    }
    if jax.process_index() == 0:
        rundir.write_jsonl(record["samples"], (
            {"id": r["id"], "prompt": r["prompt"], "real": r["response"],
             "responses": {label: dict(s[i], model=per_model[label]["path"]) for label, s in samples.items()}}
            for i, r in enumerate(rows)))
        rundir.append_eval(cfg.run_dir, record)
        log.info("\n" + format_record(record))
        with tracking.start(cfg, f"evaluate iter{t}") as tracker:
            tracker.evaluation(record)
    sharding.barrier("evaluate")
    return record


def export_iteration(cfg: Config, t: int, out_dir: str, dtype: Optional[str] = None,
                     adapter_only: bool = False) -> str:
    """Iteration t's model (runs/<run>/iter<t>/model) re-exported as an HF directory with a model
    card, written to a fresh temporary directory next to out_dir and renamed into place. dtype
    defaults to the stored one. `adapter_only`: the iteration's LoRA adapter in PEFT's format
    (iter<t>/adapter) instead, with a card saying how to load it on its base."""
    from spin_jax.io import hf

    src = rundir.model_specs(cfg.model.name, cfg.run_dir, t, cfg.sft_dir() if cfg.model.init == "sft" else None)[-1][1]
    rundir.check_new_dir(out_dir, "--out", protect=(src, cfg.run_dir))
    if adapter_only:
        return _export_adapter(cfg, t, out_dir)
    stored = rundir.read_json(os.path.join(src, "config.json"))
    dtype = dtype or stored.get("dtype") or stored.get("torch_dtype") or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype {dtype!r}: expected float32, bfloat16 or float16")
    model = load_model(src)
    card = rundir.model_card(cfg.run_dir, t, dtype)
    with rundir.written_dir(out_dir) as tmp:  # out_dir is new or empty (checked above)
        hf.export_hf_dir(model.params, model.cfg, tmp, model.tokenizer, dtype=dtype,
                         extra_files={"README.md": card})
    log.info(f"exported iteration {t} ({src}) to {out_dir} as {dtype}")
    return out_dir


def export_sft(cfg: Config, init: str, out_dir: str, dtype: Optional[str] = None) -> str:
    """An SFT model (runs/<run>/sft/model for init "base", sft_from_iter<t>/model for "iter<t>")
    re-exported as an HF directory with its model card, like `export_iteration`."""
    from spin_jax import sft
    from spin_jax.io import hf

    src = os.path.join(cfg.sft_dir(init), "model")
    if not sft.is_done(cfg.sft_dir(init)):
        raise FileNotFoundError(f"--sft {init}: {src} does not exist; run `spin-jax sft --config ... --init {init}` "
                                "first")
    rundir.check_new_dir(out_dir, "--out", protect=(src, cfg.run_dir))
    stored = rundir.read_json(os.path.join(src, "config.json"))
    dtype = dtype or stored.get("dtype") or stored.get("torch_dtype") or "float32"
    model = load_model(src)
    with open(os.path.join(src, "README.md"), encoding="utf-8") as f:
        card = f.read()
    with rundir.written_dir(out_dir) as tmp:
        hf.export_hf_dir(model.params, model.cfg, tmp, model.tokenizer, dtype=dtype, extra_files={"README.md": card})
    log.info(f"exported the SFT model {src} to {out_dir} as {dtype}")
    return out_dir


def _export_adapter(cfg: Config, t: int, out_dir: str) -> str:
    adapter = rundir.adapter_dir(cfg.run_dir, t)
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise UsageError(f"--adapter-only: iteration {t} has no adapter ({adapter}); it was trained without LoRA "
                         "(model.lora.rank = 0). Export the whole model instead (leave out --adapter-only)")
    conf = rundir.read_json(os.path.join(adapter, "adapter_config.json"))
    with rundir.written_dir(out_dir) as tmp:  # out_dir is new or empty (checked by the caller)
        for name in os.listdir(adapter):
            shutil.copy2(os.path.join(adapter, name), tmp)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(rundir.adapter_card(cfg.run_dir, t, conf))
    log.info(f"exported iteration {t}'s adapter ({adapter}) to {out_dir}")
    return out_dir


# ----------------------------------------------------------------------------------------------
# helpers


def heldout_rows(cfg: Config, t: int, tokenizer) -> list[dict]:
    """The first data.num_eval_prompts usable prompts of data.eval_split, refusing any that a
    training iteration 0..t sampled (the eval split must not overlap the training prompts)."""
    d = cfg.data
    if d.eval_split == d.train_split:
        raise ValueError(f"data.eval_split and data.train_split are both {d.eval_split!r}; hold out a "
                         "part, e.g. train_split: 'train[:95%]', eval_split: 'train[95%:]'")
    rows = prompt_rows(d, d.eval_split, d.num_eval_prompts, tokenizer)
    if not rows:
        raise ValueError(f"{d.name} {d.eval_split}: no usable held-out prompts (data.eval_split, "
                         f"data.max_prompt_length={d.max_prompt_length})")
    ids = {r["id"] for r in rows}
    for k in range(t + 1):
        trained = store_lib.SyntheticStore(rundir.store_dir(cfg.run_dir, k)).expected_ids() or []
        both = ids.intersection(trained)
        if both:
            raise ValueError(f"data.eval_split {d.eval_split!r} overlaps iteration {k}'s training prompts "
                             f"({len(both)} ids, e.g. {sorted(both)[:3]}); choose disjoint "
                             "data.train_split and data.eval_split")
    return rows


class Programs:
    """The sampler and the scoring program for one model config, compiled once and shared by every
    model of the run (they differ only in their params)."""

    def __init__(self, cfg: Config, model_cfg, mesh, pad_id: int):
        self.model_cfg, self.mesh, self.pad_id = model_cfg, mesh, pad_id
        self.rows = 2 * cfg.sampling.batch_size  # scoring batch: as many rows as a batch of pairs
        self.sampler = Sampler(model_cfg, mesh, batch_size=cfg.sampling.batch_size, pad_id=pad_id,
                               decode_phases=cfg.sampling.decode_phases, layout=cfg.sampling.layout)
        self.score_fn = scoring.logps_fn(model_cfg, mesh, cfg.train.vocab_chunk, self.rows)
        self.pair_fn = scoring.logps_fn(model_cfg, mesh, cfg.train.vocab_chunk, self.rows, group=2)

    def place(self, params):
        """Params in the scoring layout (the sampler takes its own copy in the decode layout)."""
        return transformer.shard_params(params, self.model_cfg, self.mesh)

    def logps(self, params, prompts: list[list[int]], responses: list[list[int]], progress: bool,
              desc: str) -> np.ndarray:
        """Summed log-probs [N] of each response given its prompt, packed as training packs them."""
        return scoring.logps_in_batches(self.score_fn, params, prompts, responses, self.rows, self.pad_id,
                                        self.mesh, progress, desc)

    def pair_logps(self, params, pairs, progress: bool, desc: str) -> np.ndarray:
        """(logp real, logp generated) [N, 2] of encoded pairs, each prompt computed once."""
        return scoring.pair_logps(self.pair_fn, params, pairs, self.rows, self.pad_id, self.mesh, progress, desc)


def sample(progs: Programs, params, tok, rows: list[dict], sp, seed: int, progress: bool, desc: str) -> list[dict]:
    """The model's responses to the rows' prompts: [{"text", "n_tokens", "finish_reason"}]."""
    update, bar = progress_bar(len(rows), desc=desc, disable=not progress)
    prompts = [tokenize.prompt_ids(tok, r["prompt"]) for r in rows]
    out = progs.sampler.generate(progs.sampler.place(params), prompts, sp, seed=seed, progress=update)
    bar.close()
    return [{"text": smp.text(tok), "n_tokens": smp.n_tokens, "finish_reason": smp.finish_reason} for smp in out]


def model_stats(real_logps: np.ndarray, real_lengths: list[int], samples: list[dict]) -> dict:
    lengths = np.asarray([s["n_tokens"] for s in samples])
    return {"logp_per_token": float(real_logps.sum() / max(sum(real_lengths), 1)),
            "logp_sum_mean": float(real_logps.mean()),
            "gen_len_mean": float(lengths.mean()), "gen_len_median": float(np.median(lengths)),
            "gen_len_max": int(lengths.max()),
            "eos_share": float(np.mean([s["finish_reason"] == "eos" for s in samples]))}


def settings(cfg: Config, sp, seed: int) -> dict:
    d, tc = cfg.data, cfg.train
    return {"data": d.name, "eval_split": d.eval_split, "num_eval_prompts": d.num_eval_prompts,
            "max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
            "beta": tc.beta, "loss_type": tc.loss_type, "sampling": dict(sp.to_dict(), seed=seed),
            "dtype": cfg.model.dtype, "param_dtype": cfg.model.param_dtype, "base_model": cfg.model.name}


def format_record(r: dict) -> str:
    w = max(10, *(len(label) + 2 for label in r["models"]))
    lines = [f"=== held-out evaluation, iteration {r['iteration']}: {r['num_prompts']} prompts, "
             f"{r['wall_seconds']:.0f}s ===",
             "SPIN (θ%d vs θ%d): " % (r["iteration"] + 1, r["iteration"])
             + ", ".join(f"{k} {v:.4f}" for k, v in r["spin"].items()),
             f"{'model':<{w}}{'logp/token':>12}{'len mean':>10}{'median':>8}{'max':>6}{'eos':>7}"]
    for label, m in r["models"].items():
        lines.append(f"{label:<{w}}{m['logp_per_token']:>12.4f}{m['gen_len_mean']:>10.1f}"
                     f"{m['gen_len_median']:>8.1f}{m['gen_len_max']:>6d}{m['eos_share']:>7.2f}")
    lines.append(f"samples: {r['samples']}")
    return "\n".join(lines)
