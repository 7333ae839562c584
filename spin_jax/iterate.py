"""The SPIN iteration driver: generate (opponent samples + its log-probs), train, the whole loop.
The run directory's layout and files are `spin_jax.rundir`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time

import jax
import numpy as np

from spin_jax import rundir, scoring, sharding, tracking
from spin_jax.config import Config
from spin_jax.data import examples as ex
from spin_jax.data import store as store_lib
from spin_jax.data import tokenize
from spin_jax.data.prompts import prompt_rows
from spin_jax.io.load import load_model_for
from spin_jax.model import transformer

log = logging.getLogger(__name__)


def opponent_spec(cfg: Config, t: int) -> str:
    """θt: for t = 0 the base model (model.init: base) or its SFT (model.init: sft), else iteration
    t-1's exported model."""
    return rundir.opponent_spec(cfg.model.name, cfg.run_dir, t, cfg.sft_dir() if cfg.model.init == "sft" else None)


def ensure_theta0(cfg: Config, t: int, progress: bool = True) -> None:
    """With model.init: sft, iteration 0 needs the SFT model: SFT runs first (resumably) when it is
    absent."""
    from spin_jax import sft

    if t == 0 and cfg.model.init == "sft" and not sft.is_done(cfg.sft_dir()):
        log.info(f"model.init=sft: θ0 ({cfg.sft_dir()}/model) is absent, so SFT runs first")
        sft.run_sft(cfg, "base", progress=progress)


def load_opponent(cfg: Config, t: int):
    """(θt as loaded, the opponent as it runs). They are the same model, except with LoRA: the
    opponent is then the frozen base the adapters train on, in model.base_dtype (quantized for
    int8/nf4), so that its samples and log-probs are exactly the main player's at step 0."""
    model = load_model_for(cfg.model, opponent_spec(cfg, t))
    return model, lora_base(cfg, model)


def lora_base(cfg: Config, model):
    """`model` as LoRA's frozen base: weights in model.base_dtype (int8/nf4: the seven projections
    quantized, the rest in param_dtype), its config carrying the adapters' scale and dropout.
    Without LoRA, `model` itself."""
    from spin_jax.model import lora

    return lora.frozen_base(model, cfg.model)


# ----------------------------------------------------------------------------------------------
# generate


def generate(cfg: Config, t: int, model=None, progress: bool = True) -> str:
    """Sample the opponent's responses for iteration t's prompts into its store, resumably, then
    store the opponent's log-probs of the real and generated responses. Returns the store dir.

    With several processes every host samples and scores its own chunks (chunk c is host
    c % process_count's, shard-<host>-<chunk>) on a mesh of its own devices; all hosts must call
    this, and return together once the whole store is complete."""
    sharding.maybe_initialize_distributed(cfg.distributed)
    ensure_theta0(cfg, t, progress)
    with iteration_lock(cfg, t, "generate"):
        return _generate(cfg, t, model, progress)


def iteration_lock(cfg: Config, t: int, what: str):
    """Process 0 holds iteration t's directory for the command (a second run fails at once)."""
    if jax.process_index() != 0:
        return contextlib.nullcontext()
    return rundir.locked(cfg.iter_dir(t), f"spin-jax {what} --iter {t}")


def _generate(cfg: Config, t: int, model, progress: bool) -> str:
    from spin_jax.sampling import Sampler, SamplingParams, derive_seed, progress_bar

    directory = rundir.store_dir(cfg.run_dir, t)
    store = store_lib.SyntheticStore(directory)
    model = model or load_opponent(cfg, t)[1]
    tok = model.tokenizer
    rows = prompt_rows(cfg.data, cfg.data.train_split, cfg.data.num_prompts, tok)
    by_id = {r["id"]: r for r in rows}
    ids = [r["id"] for r in rows]
    if jax.process_index() == 0:
        store.set_expected(ids)
    pending = store_lib.pending_chunks(ids, cfg.sampling.chunk_size, store.done_ids(),
                                       jax.process_index(), jax.process_count())
    mesh = sharding.local_mesh_from_config(cfg.mesh)
    if pending:
        s = cfg.sampling
        sp = SamplingParams.from_config(s, tok)
        sampler = Sampler(model.cfg, mesh, batch_size=s.batch_size, pad_id=tok.pad_token_id or 0,
                          decode_phases=s.decode_phases, param_shapes=model.params, layout=s.layout)
        params = sampler.place(model.params)
        mhash = model_hash(model.source)
        left = sum(len(c_ids) for _, c_ids in pending)
        log.info(f"iteration {t}: sampling {left} of {len(ids)} prompts with {opponent_spec(cfg, t)} "
                 f"(max_new_tokens={s.max_new_tokens}, T={s.temperature}, top_p={s.top_p})")
        update, bar = progress_bar(left, desc=f"generate iter{t}", disable=not progress or jax.process_index() != 0)
        for chunk, chunk_ids in pending:
            prompts = [tokenize.prompt_ids(tok, by_id[i]["prompt"]) for i in chunk_ids]
            seed = derive_seed(s.seed, t, chunk)
            samples = sampler.generate(params, prompts, sp, seed=seed, progress=update)
            out = [{"id": i, "prompt": by_id[i]["prompt"], "real": by_id[i]["response"],
                    "generated": smp.text(tok), "finish_reason": smp.finish_reason,
                    "n_generated_tokens": smp.n_tokens,
                    "sample_logp": smp.logp if sp.logps_are_model_logps else None,
                    "sampling": dict(sp.to_dict(), seed=seed), "model_hash": mhash,
                    "opponent_logp_real": None, "opponent_logp_generated": None}
                   for i, smp in zip(chunk_ids, samples)]
            store.write_shard(jax.process_index(), chunk, out)
        bar.close()
        log.info(f"sampling compiled {len(sampler.compiled_programs)} program(s): "
                 f"prompt buckets {sorted(k[0] for k in sampler.compiled_programs)}")
    missing = own_rows_without_logps(store)
    if missing:
        logps = opponent_logps(cfg, model, missing, mesh, progress)
        store.update_logps({r["id"]: v for r, v in zip(missing, logps)})
    sharding.barrier("generate")
    return directory


def own_rows_without_logps(store) -> list[dict]:
    """Rows without opponent log-probs in the shards of this host's chunks (all on one host)."""
    own = set()
    for name, entry in store.manifest()["shards"].items():
        if int(store_lib.SHARD_RE.match(name).group(2)) % jax.process_count() == jax.process_index():
            own.update(entry["ids"])
    return [r for r in store.rows() if r["id"] in own and r.get("opponent_logp_real") is None]


def opponent_logps(cfg: Config, model, rows: list[dict], mesh, progress: bool = True) -> list[tuple]:
    """(logp real, logp generated) under `model` for each row, encoded exactly as training encodes
    them (same template and truncation), so stored values equal the in-step computation."""
    d = cfg.data
    encoded = ex.encode_rows(model.tokenizer, rows, d.max_length, d.max_prompt_length, source="store")
    batch_rows = 2 * cfg.sampling.batch_size
    fn = scoring.logps_fn(model.cfg, mesh, cfg.train.vocab_chunk, batch_rows, group=2)
    params = transformer.shard_params(model.params, model.cfg, mesh)
    lp = scoring.pair_logps(fn, params, encoded, batch_rows, model.tokenizer.pad_token_id or 0, mesh, progress,
                            desc="opponent log-probs")
    return [(float(real), float(gen)) for real, gen in lp]


# ----------------------------------------------------------------------------------------------
# train


def train_iteration(cfg: Config, t: int, progress: bool = True, stop_after=None) -> dict:
    """Generate iteration t's data if incomplete, then train θ(t+1) from θt against θt."""
    sharding.maybe_initialize_distributed(cfg.distributed)
    if rundir.is_trained(cfg.run_dir, t):
        log.info(f"iteration {t} is already trained: {cfg.iter_dir(t)}/model (delete it to train again)")
        return rundir.read_or_rebuild_summary(cfg.run_dir, t)
    ensure_theta0(cfg, t, progress)
    with iteration_lock(cfg, t, "train"):
        return _train_iteration(cfg, t, progress, stop_after)


def _train_iteration(cfg: Config, t: int, progress: bool, stop_after) -> dict:
    from spin_jax import train

    out_dir = cfg.iter_dir(t)
    t_start = time.time()
    mesh = sharding.mesh_from_config(cfg.mesh)  # a mesh the devices cannot form fails before any work
    theta, model = load_opponent(cfg, t)  # model: the opponent as it runs (θt, or LoRA's base)
    store = store_lib.SyntheticStore(rundir.store_dir(cfg.run_dir, t))
    incomplete = store.missing_count() or not store.shard_names() or \
        any(r.get("opponent_logp_real") is None for r in store.rows())
    sharding.barrier("store checked")  # every host sees the same store before any host writes
    if incomplete:
        _generate(cfg, t, model, progress)
    rows = store_lib.training_rows(cfg.run_dir, t, cfg.data.mix_previous)
    if cfg.train.opponent_logps == "precomputed":
        rows = with_current_opponent_logps(cfg, t, model, rows, sharding.local_mesh_from_config(cfg.mesh), progress)
    d, tc = cfg.data, cfg.train
    examples = ex.encode_rows(model.tokenizer, rows, d.max_length, d.max_prompt_length,
                              source=f"{out_dir}/synthetic", max_bad_fraction=d.max_bad_fraction)
    steps = tc.epochs * ex.steps_per_epoch(len(examples), tc.global_batch_size)
    lr = tc.lr_for_iter(t)
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        rundir.write_json(os.path.join(out_dir, rundir.CONFIG),
                          dict(cfg.to_dict(), iteration=t, opponent=opponent_spec(cfg, t)))
    mixed = f"iter{t - 1} + iter{t}" if t and d.mix_previous else f"iter{t}"
    log.info(f"iteration {t}: training on {len(examples)} pairs ({mixed}), {steps} updates of "
             f"{tc.global_batch_size} pairs, lr {lr:g}, beta {tc.beta}, mesh {dict(mesh.shape)}")

    def batches_from(start):
        for *_, batch in ex.iter_batches(examples, tc.global_batch_size, seed=d.seed, num_epochs=tc.epochs,
                                         start_step=start, process_index=jax.process_index(),
                                         process_count=jax.process_count(),
                                         pad_id=model.tokenizer.pad_token_id or 0):
            yield batch

    with tracking.start(cfg, f"train iter{t}") as tracker:
        offset = tracking.global_step_offset(cfg.run_dir, t) if tracker.on else 0
        tracker.samples(t, [r for r in rows if r["iteration"] == t])
        trainer = train.Trainer(model.cfg, tc, mesh, steps, lr, out_dir, progress=progress,
                                on_metrics=lambda m: tracker.update(t, offset + m["step"], m))
        return _train_and_export(cfg, t, trainer, theta, model, batches_from, stop_after, steps, t_start, tracker)


def _train_and_export(cfg: Config, t: int, trainer, theta, model, batches_from, stop_after, steps: int,
                      t_start: float, tracker) -> dict:
    from spin_jax.io import hf

    out_dir, d = cfg.iter_dir(t), cfg.data
    lo = cfg.model.lora
    if lo.rank:  # adapters on the frozen base; the in-step opponent is that base
        from spin_jax.model import lora

        adapters = lora.init_adapters(model.cfg, lo.targets, lo.rank, jax.random.key(d.seed + t))
        final, summary = trainer.run(adapters, None, batches_from, stop_after=stop_after, base=model.params)
    else:
        params = jax.tree.map(lambda x: np.asarray(x, model.cfg.param_dtype), model.params)
        final, summary = trainer.run(params, model.params, batches_from, stop_after=stop_after)
    if stop_after is not None and summary["steps"] < steps:
        return summary
    if jax.process_index() == 0:
        summary = rundir.summarize(summary, time.time() - t_start, t, cfg.run_dir)
        rundir.write_json(os.path.join(out_dir, rundir.SUMMARY), summary)
        dtype = theta.cfg.param_dtype
        card = rundir.model_card(cfg.run_dir, t, dtype, summary)
        if lo.rank:  # θ(t+1) = θt + scale * B A, merged in float64 onto θt at full precision
            with rundir.written_dir(rundir.adapter_dir(cfg.run_dir, t)) as tmp:
                lora.export_peft(final, theta.cfg, tmp, lo.targets, lo.rank, lo.alpha, lo.dropout,
                                 opponent_spec(cfg, t))
            final = lora.merge(theta.params, final, model.cfg.lora_scale, dtype=jax.numpy.dtype(dtype))
        with rundir.written_dir(rundir.model_dir(cfg.run_dir, t)) as tmp:
            hf.export_hf_dir(final, theta.cfg, tmp, model.tokenizer, dtype=dtype, extra_files={"README.md": card})
        log.info("\n" + rundir.format_summary(summary))
        tracker.iteration(t, summary)
    sharding.barrier("train")
    return summary


def with_current_opponent_logps(cfg: Config, t: int, model, rows: list[dict], mesh, progress: bool) -> list[dict]:
    """Rows from iteration t-1 carry θ(t-1)'s log-probs; iteration t's opponent is θt, so those are
    recomputed once (cached in iter<t>/opponent_logps_prev.json). Every host computes them on its
    own devices (no cross-host collectives); host 0 writes the cache."""
    prev = [r for r in rows if r["iteration"] != t]
    if not prev:
        return rows
    path = os.path.join(cfg.iter_dir(t), "opponent_logps_prev.json")
    cache = rundir.read_json(path) or {}
    todo = [r for r in prev if r["id"] not in cache]
    if todo:
        log.info(f"computing iteration {t}'s opponent log-probs for {len(todo)} rows of iteration {t - 1}")
        for r, v in zip(todo, opponent_logps(cfg, model, todo, mesh, progress)):
            cache[r["id"]] = v
        if jax.process_index() == 0:
            rundir.atomic_write(path, json.dumps(cache))
    return [r if r["iteration"] == t else
            dict(r, opponent_logp_real=cache[r["id"]][0], opponent_logp_generated=cache[r["id"]][1])
            for r in rows]


def spin(cfg: Config, iters: int, progress: bool = True) -> None:
    """The whole self-play loop: iterations 0 .. iters-1, each resumable."""
    for t in range(iters):
        train_iteration(cfg, t, progress=progress)


def model_hash(source: str) -> str:
    """A cheap identity of the opponent's weights: path, sizes and mtimes of its files."""
    h = hashlib.sha256()
    paths = [os.path.join(source, f) for f in sorted(os.listdir(source))] if os.path.isdir(source) else [source]
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.basename(p)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]
