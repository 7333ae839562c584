"""The SPIN iteration driver: generate (opponent samples + its log-probs), train, the whole loop.

Run directory (see ARCHITECTURE.md):
    runs/<run>/iter<t>/synthetic/     the iteration's store (atomic shards + manifest)
    runs/<run>/iter<t>/checkpoints/   orbax checkpoints (resume)
    runs/<run>/iter<t>/model/         θ(t+1) as an HF directory: iteration t+1's init and opponent
    runs/<run>/iter<t>/metrics.jsonl, tensorboard/, summary.json, config.json
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import jax
import numpy as np

from spin_jax import sharding
from spin_jax.config import Config
from spin_jax.data import examples as ex
from spin_jax.data import store as store_lib
from spin_jax.data import tokenize


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"[spin-jax] {msg}", flush=True)


def opponent_spec(cfg: Config, t: int) -> str:
    """θt: the base model for t = 0, else iteration t-1's exported model."""
    if t == 0:
        return cfg.model.name
    prev = os.path.join(cfg.iter_dir(t - 1), "model")
    if not os.path.exists(os.path.join(prev, "config.json")):
        raise FileNotFoundError(
            f"iteration {t} starts from iteration {t - 1}'s model, but {prev} does not exist; run "
            f"`make train ITER={t - 1}` (or `spin-jax train --config ... --iter {t - 1}`) first")
    return prev


def load_opponent(cfg: Config, t: int):
    from spin_jax.io.load import load_model

    m = cfg.model
    return load_model(opponent_spec(cfg, t), dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                      attn_block=m.attn_block)


def prompt_rows(cfg: Config, split: str, limit: int, tokenizer) -> list[dict]:
    """The first `limit` rows of `split` whose templated prompt fits max_prompt_length tokens
    (longer prompts are skipped, counted and reported: the reference would cut their start)."""
    from spin_jax.data.builders import load_split

    d = cfg.data
    # Hosts may share data_dir: host 0 prepares the data set, the others read it afterwards.
    if jax.process_index() != 0:
        multihost_barrier(f"prepare {d.name}")
    rows = load_split(d.name, d.data_dir, split, d.manual_dir, d.max_bad_fraction)
    if jax.process_index() == 0:
        multihost_barrier(f"prepare {d.name}")
    out, skipped = [], 0
    for i in range(len(rows)):
        if len(out) == limit:
            break
        if len(tokenize.prompt_ids(tokenizer, rows[i]["prompt"])) > d.max_prompt_length:
            skipped += 1
            continue
        out.append(rows[i])
    if skipped:
        log(f"{d.name} {split}: skipped {skipped} prompts longer than max_prompt_length={d.max_prompt_length}")
    if len(out) < limit:
        log(f"{d.name} {split}: only {len(out)} usable prompts (asked for {limit})")
    return out


# ----------------------------------------------------------------------------------------------
# generate


def generate(cfg: Config, t: int, model=None, progress: bool = True) -> str:
    """Sample the opponent's responses for iteration t's prompts into its store, resumably, then
    store the opponent's log-probs of the real and generated responses. Returns the store dir.

    With several processes every host samples and scores its own chunks (chunk c is host
    c % process_count's, shard-<host>-<chunk>) on a mesh of its own devices; all hosts must call
    this, and return together once the whole store is complete."""
    from spin_jax.sampling import Sampler, progress_bar

    sharding.maybe_initialize_distributed(cfg.distributed)
    directory = store_lib.store_dir(cfg.run_dir, t)
    store = store_lib.SyntheticStore(directory)
    model = model or load_opponent(cfg, t)
    tok = model.tokenizer
    rows = prompt_rows(cfg, cfg.data.train_split, cfg.data.num_prompts, tok)
    by_id = {r["id"]: r for r in rows}
    ids = [r["id"] for r in rows]
    if jax.process_index() == 0:
        store.set_expected(ids)
    pending = store_lib.pending_chunks(ids, cfg.sampling.chunk_size, store.done_ids(),
                                       jax.process_index(), jax.process_count())
    mesh = make_local_mesh(cfg)
    if pending:
        s = cfg.sampling
        sp = sampling_params(cfg, tok)
        sampler = Sampler(model.cfg, mesh, batch_size=s.batch_size, pad_id=tok.pad_token_id or 0,
                          decode_phases=s.decode_phases)
        params = sampler.place(model.params)
        mhash = model_hash(model.source)
        left = sum(len(c_ids) for _, c_ids in pending)
        log(f"iteration {t}: sampling {left} of {len(ids)} prompts with {opponent_spec(cfg, t)} "
            f"(max_new_tokens={s.max_new_tokens}, T={s.temperature}, top_p={s.top_p})")
        update, bar = progress_bar(left, desc=f"generate iter{t}", disable=not progress or jax.process_index() != 0)
        for chunk, chunk_ids in pending:
            prompts = [tokenize.prompt_ids(tok, by_id[i]["prompt"]) for i in chunk_ids]
            seed = int.from_bytes(hashlib.sha256(f"{s.seed}/{t}/{chunk}".encode()).digest()[:4], "little")
            samples = sampler.generate(params, prompts, sp, seed=seed, progress=update)
            out = [{"id": i, "prompt": by_id[i]["prompt"], "real": by_id[i]["response"],
                    "generated": tok.decode(smp.tokens[:-1] if smp.finish_reason == "eos" else smp.tokens),
                    "finish_reason": smp.finish_reason, "n_generated_tokens": len(smp.tokens),
                    "sample_logp": smp.logp if sp.logps_are_model_logps else None,
                    "sampling": dict(sp.to_dict(), seed=seed), "model_hash": mhash,
                    "opponent_logp_real": None, "opponent_logp_generated": None}
                   for i, smp in zip(chunk_ids, samples)]
            store.write_shard(jax.process_index(), chunk, out)
        bar.close()
        log(f"sampling compiled {len(sampler.compiled_programs)} program(s): "
            f"prompt buckets {sorted(k[0] for k in sampler.compiled_programs)}")
    missing = own_rows_without_logps(store)
    if missing:
        logps = opponent_logps(cfg, model, missing, mesh, progress)
        store.update_logps({r["id"]: v for r, v in zip(missing, logps)})
    multihost_barrier("generate")
    return directory


def sampling_params(cfg: Config, tokenizer):
    """The config's sampling settings, stopping at the tokenizer's end-of-turn token."""
    from spin_jax.sampling import SamplingParams

    s = cfg.sampling
    return SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                          top_p=s.top_p, greedy=s.greedy, stop_ids=(tokenize.end_of_turn_id(tokenizer),))


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
    from spin_jax import scoring

    d = cfg.data
    encoded = ex.encode_rows(model.tokenizer, rows, d.max_length, d.max_prompt_length, source="store")
    batch_rows = 2 * cfg.sampling.batch_size
    fn = scoring.logps_fn(model.cfg, mesh, cfg.train.vocab_chunk, batch_rows, group=2)
    params = sharding.shard_params(model.params, model.cfg, mesh)[0]
    lp = scoring.pair_logps(fn, params, encoded, batch_rows, model.tokenizer.pad_token_id or 0, mesh, progress,
                            desc="opponent log-probs")
    return [(float(real), float(gen)) for real, gen in lp]


# ----------------------------------------------------------------------------------------------
# train


def train_iteration(cfg: Config, t: int, progress: bool = True, stop_after=None) -> dict:
    """Generate iteration t's data if incomplete, then train θ(t+1) from θt against θt."""
    from spin_jax import train
    from spin_jax.io import hf

    sharding.maybe_initialize_distributed(cfg.distributed)
    out_dir = cfg.iter_dir(t)
    if os.path.exists(os.path.join(out_dir, "model", "config.json")):
        log(f"iteration {t} is already trained: {out_dir}/model (delete it to train again)")
        return json.load(open(os.path.join(out_dir, "summary.json")))
    t_start = time.time()
    model = load_opponent(cfg, t)
    store = store_lib.SyntheticStore(store_lib.store_dir(cfg.run_dir, t))
    incomplete = store.missing_count() or not store.shard_names() or \
        any(r.get("opponent_logp_real") is None for r in store.rows())
    multihost_barrier("store checked")  # every host sees the same store before any host writes
    if incomplete:
        generate(cfg, t, model=model, progress=progress)
    mesh = make_mesh(cfg)
    rows = store_lib.training_rows(cfg.run_dir, t, cfg.data.mix_previous)
    if cfg.train.opponent_logps == "precomputed":
        rows = with_current_opponent_logps(cfg, t, model, rows, make_local_mesh(cfg), progress)
    d, tc = cfg.data, cfg.train
    examples = ex.encode_rows(model.tokenizer, rows, d.max_length, d.max_prompt_length,
                              source=f"{out_dir}/synthetic", max_bad_fraction=d.max_bad_fraction)
    spe = ex.steps_per_epoch(len(examples), tc.global_batch_size)
    steps = tc.epochs * spe
    lr = tc.lr_for_iter(t)
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(dict(cfg.to_dict(), iteration=t, opponent=opponent_spec(cfg, t)), f, indent=2)
    log(f"iteration {t}: training on {len(examples)} pairs ({'iter%d + iter%d' % (t - 1, t) if t and d.mix_previous else 'iter%d' % t}), "
        f"{steps} updates of {tc.global_batch_size} pairs, lr {lr:g}, beta {tc.beta}, mesh {dict(mesh.shape)}")

    def batches_from(start):
        for _, _, batch in ex.iter_batches(examples, tc.global_batch_size, seed=d.seed, num_epochs=tc.epochs,
                                           start_step=start, process_index=jax.process_index(),
                                           process_count=jax.process_count(),
                                           pad_id=model.tokenizer.pad_token_id or 0):
            batch.pop("index", None)
            if "opponent_logps" not in batch:
                batch["opponent_logps"] = np.zeros(batch["tokens"].shape[0], np.float32)
            yield batch

    params = jax.tree.map(lambda x: np.asarray(x, model.cfg.param_dtype), model.params)
    final, summary = train.fit(params, model.params, model.cfg, tc, mesh, batches_from, steps, lr, out_dir,
                               log=log, progress=progress, stop_after=stop_after)
    if stop_after is not None and summary["steps"] < steps:
        return summary
    if jax.process_index() == 0:
        card = model_card(cfg, t, summary)
        hf.export_hf_dir(final, model.cfg, os.path.join(out_dir, "model.tmp"), model.tokenizer,
                         dtype=model.cfg.param_dtype, extra_files={"README.md": card})
        os.replace(os.path.join(out_dir, "model.tmp"), os.path.join(out_dir, "model"))
        summary = summarize(summary, time.time() - t_start, t, os.path.join(out_dir, "metrics.jsonl"))
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(format_summary(summary))
    multihost_barrier("train")
    return summary


def with_current_opponent_logps(cfg: Config, t: int, model, rows: list[dict], mesh, progress: bool) -> list[dict]:
    """Rows from iteration t-1 carry θ(t-1)'s log-probs; iteration t's opponent is θt, so those are
    recomputed once (cached in iter<t>/opponent_logps_prev.json). Every host computes them on its
    own devices (no cross-host collectives); host 0 writes the cache."""
    prev = [r for r in rows if r["iteration"] != t]
    if not prev:
        return rows
    path = os.path.join(cfg.iter_dir(t), "opponent_logps_prev.json")
    cache = json.load(open(path)) if os.path.exists(path) else {}
    todo = [r for r in prev if r["id"] not in cache]
    if todo:
        log(f"computing iteration {t}'s opponent log-probs for {len(todo)} rows of iteration {t - 1}")
        for r, v in zip(todo, opponent_logps(cfg, model, todo, mesh, progress)):
            cache[r["id"]] = v
        if jax.process_index() == 0:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(cache, f)
            os.replace(tmp, path)
    return [r if r["iteration"] == t else
            dict(r, opponent_logp_real=cache[r["id"]][0], opponent_logp_generated=cache[r["id"]][1])
            for r in rows]


def spin(cfg: Config, iters: int, progress: bool = True) -> None:
    """The whole self-play loop: iterations 0 .. iters-1, each resumable."""
    for t in range(iters):
        train_iteration(cfg, t, progress=progress)


# ----------------------------------------------------------------------------------------------
# helpers


def make_mesh(cfg: Config):
    return sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)


def make_local_mesh(cfg: Config):
    """This host's devices only (= make_mesh on one host): for sampling and scoring."""
    return sharding.make_local_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)


def multihost_barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def model_hash(source: str) -> str:
    """A cheap identity of the opponent's weights: path, sizes and mtimes of its files."""
    h = hashlib.sha256()
    paths = [os.path.join(source, f) for f in sorted(os.listdir(source))] if os.path.isdir(source) else [source]
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.basename(p)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


SUMMARY_KEYS = ("loss", "rewards/real", "rewards/generated", "rewards/margins", "rewards/accuracies",
                "logps/real", "logps/generated")


def summarize(summary: dict, wall: float, t: int, metrics_path: str) -> dict:
    """First/last-quarter means over every update of the iteration: read from metrics.jsonl, so a
    resumed run is summarised whole (an update logged twice across a restart counts once)."""
    summary.pop("history")
    by_step = {}
    with open(metrics_path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill
                continue
            by_step[row["step"]] = row
    hist = [by_step[k] for k in sorted(by_step)]
    k = max(1, len(hist) // 4)
    first = {key: float(np.mean([h[key] for h in hist[:k]])) for key in SUMMARY_KEYS} if hist else {}
    last = {key: float(np.mean([h[key] for h in hist[-k:]])) for key in SUMMARY_KEYS} if hist else {}
    return dict(summary, iteration=t, wall_seconds=wall, first_quarter=first, last_quarter=last)


def format_summary(s: dict) -> str:
    lines = [f"=== SPIN iteration {s['iteration']}: {s['steps']} updates, {s['skipped_updates']} skipped, "
             f"train {s['train_seconds']:.0f}s, total {s['wall_seconds']:.0f}s ===",
             f"{'metric':<22}{'first 25%':>12}{'last 25%':>12}"]
    for key in SUMMARY_KEYS:
        if key in s["first_quarter"]:
            lines.append(f"{key:<22}{s['first_quarter'][key]:>12.4f}{s['last_quarter'][key]:>12.4f}")
    return "\n".join(lines)


def model_card(cfg: Config, t: int, summary: dict) -> str:
    return (f"# SPIN iteration {t} (spin_jax)\n\n"
            f"- base model: `{cfg.model.name}`\n- opponent: `{opponent_spec(cfg, t)}`\n"
            f"- data: `{cfg.data.name}` ({cfg.data.num_prompts} prompts per iteration, "
            f"mix_previous={cfg.data.mix_previous})\n"
            f"- loss: {cfg.train.loss_type}, beta {cfg.train.beta}, optimizer {cfg.train.optimizer}, "
            f"lr {cfg.train.lr_for_iter(t)}, epochs {cfg.train.epochs}, global batch {cfg.train.global_batch_size}\n"
            f"- sampling: T={cfg.sampling.temperature}, top_p={cfg.sampling.top_p}, "
            f"max_new_tokens={cfg.sampling.max_new_tokens}\n- updates: {summary['steps']}\n")
