"""SPIN train-step throughput and peak memory: spin_jax vs a PyTorch step doing the reference's work.

PyTorch baseline (what uclaml/SPIN does per step, minus DeepSpeed): transformers LlamaForCausalLM
policy + a deep-copied frozen opponent, ONE concatenated forward of real and generated sequences,
fp32 logits, summed response log-probs, the sigmoid SPIN loss, backward, torch RMSprop.
spin_jax: the jitted train step with the opponent in the step, and with precomputed opponent
log-probs (the default: the opponent is scored once per iteration, not every step). Both sides get
the same pairs and compute the same loss; spin_jax's step runs each prompt once for its two
responses and takes logits on response positions only (tokens/s counts the same 2 x (P + R)
tokens per pair on both sides).

Each variant runs in its own subprocess (so peak RSS is its own); one invocation runs all of them
`--rounds` times in alternating order (torch, in-step, precomputed, then the reverse), so a slow
spell of a shared machine does not land on one side only, and prints each run, every variant's
fastest step, the ratios against the PyTorch step (best against best, per round, and the median of
the per-round ratios), and peak memory.

With --lora the variants are spin_jax's full step (the baseline), LoRA rank 16 on the fp32 base
and QLoRA on an nf4 base, all with precomputed opponent log-probs; the ratios are against the
full step.

With --sft the variants are SFT steps (`spin_jax.sft`) on 2 x pairs rows of prompt + response
tokens, the loss on the response tokens (token mean over the step), AdamW: PyTorch's (transformers'
model, cross-entropy with the prompt masked, micro-batches of 2 x micro-pairs rows) against
spin_jax's. Each row is one conversation (no packing), the same tokens on both sides.

    make bench-train
    make bench-train ARGS="--lora"
    make bench-train ARGS="--sft"
    python bench/bench_train.py --pairs 4 --prompt-len 256 --response-len 256 --steps 2 --rounds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("torch", "jax-in_step", "jax-precomputed")
# --lora: the full spin_jax step (precomputed opponent log-probs) is the baseline, against LoRA
# rank 16 (alpha 32, every projection) on the fp32 base and QLoRA on an nf4 base
LORA_VARIANTS = ("jax-precomputed", "jax-lora", "jax-qlora")
LORA_RANK = 16
SFT_VARIANTS = ("torch-sft", "jax-sft")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--response-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step, per run")
    ap.add_argument("--rounds", type=int, default=2,
                    help="runs of every variant, in alternating order (torch first, then last); "
                         "each variant's fastest step is its figure")
    ap.add_argument("--micro-pairs", type=int, default=1,
                    help="pairs per micro-batch on both sides: a step accumulates gradients over "
                         "pairs / micro-pairs forward/backward passes, then updates once")
    ap.add_argument("--vocab-chunk", type=int, default=0)
    ap.add_argument("--remat", default="dots", choices=("none", "full", "dots"),
                    help="spin_jax's remat policy (dots: fastest on CPU, as configs/cpu_default.yaml)")
    ap.add_argument("--attn-block", type=int, default=128,
                    help="spin_jax's causal attention query block (model.attn_block; 0: one block)")
    ap.add_argument("--lora", action="store_true",
                    help=f"full step vs LoRA rank {LORA_RANK} vs QLoRA (nf4), instead of PyTorch vs spin_jax")
    ap.add_argument("--sft", action="store_true", help="SFT steps: PyTorch's against spin_jax's (see the docstring)")
    ap.add_argument("--only", choices=VARIANTS + LORA_VARIANTS[1:] + SFT_VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.only:
        out = (run_torch(args) if args.only == "torch" else run_torch_sft(args) if args.only == "torch-sft"
               else run_jax(args, args.only.split("-", 1)[1]))
        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print("RESULT " + json.dumps(out), flush=True)
        return
    variants = LORA_VARIANTS if args.lora else SFT_VARIANTS if args.sft else VARIANTS
    tokens = 2 * args.pairs * (args.prompt_len + args.response_len)
    if args.pairs % args.micro_pairs:
        sys.exit(f"--pairs {args.pairs} does not split into micro-batches of --micro-pairs {args.micro_pairs}")
    print(f"# {os.cpu_count()} CPUs; {args.pairs} pairs x {args.prompt_len + args.response_len} tokens "
          f"= {tokens} tokens per step in micro-batches of {args.micro_pairs} pair(s), fp32, "
          f"{args.steps} timed steps after a warm-up")
    runs = []
    for rnd in range(args.rounds):  # A B C, then C B A, ...: a slow spell of the machine hits both sides
        for v in (variants if rnd % 2 == 0 else variants[::-1]):
            cmd = [sys.executable, __file__, "--only", v, "--model", args.model, "--pairs", str(args.pairs),
                   "--prompt-len", str(args.prompt_len), "--response-len", str(args.response_len),
                   "--steps", str(args.steps), "--micro-pairs", str(args.micro_pairs),
                   "--vocab-chunk", str(args.vocab_chunk), "--remat", args.remat,
                   "--attn-block", str(args.attn_block)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{v} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            r = json.loads(lines[-1][len("RESULT "):])
            r.update(variant=v, round=rnd + 1, tok_s=tokens / r["step_s"])
            runs.append(r)
            print(f"round {rnd + 1} {v:16s} {r['tok_s']:8.1f} tok/s  step {r['step_s']:6.2f}s  "
                  f"peak RSS {r['peak_rss_gib']:.2f} GiB"
                  + (f"  compile {r['compile_s']:.1f}s" if "compile_s" in r else ""), flush=True)
    results, ratios = summarize_runs(runs, args.rounds, variants)
    for v in variants:
        print(f"best {v:16s} {results[v]['tok_s']:8.1f} tok/s  step {results[v]['step_s']:6.2f}s  "
              f"peak RSS {results[v]['peak_rss_gib']:.2f} GiB", flush=True)
    for v, r in ratios.items():
        print(f"ratio {v} / {variants[0]}: {r['best']:.2f}x tok/s (best against best; per round: "
              + ", ".join(f"{x:.2f}x" for x in r["per_round"]) + f"; median {r['median']:.2f}x); "
              f"peak RSS {r['rss']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"best": results, "runs": runs, "ratios": ratios}, f, indent=2)


def batch_arrays(args, vocab: int, seed: int = 0):
    """4 pairs: the same prompt for real and generated, random but fixed token ids, no padding;
    in the training layout (each prompt once, real and generated responses interleaved)."""
    import numpy as np

    from spin_jax.data import tokenize

    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(100, vocab, args.prompt_len)) for _ in range(args.pairs)]
    real = [list(rng.integers(100, vocab, args.response_len)) for _ in range(args.pairs)]
    gen = [list(rng.integers(100, vocab, args.response_len)) for _ in range(args.pairs)]
    return prompts, real, gen, tokenize.pack_grouped(prompts, [x for pair in zip(real, gen) for x in pair],
                                                     args.prompt_len, args.response_len,
                                                     opponent_logps=np.full(2 * args.pairs, -300.0, np.float32))


def summarize_runs(runs: list[dict], rounds: int, variants=VARIANTS) -> tuple[dict, dict]:
    """Each variant's fastest run (with its largest peak RSS over the rounds), and each other
    variant's ratio to the first (the baseline): tokens/s best against best, per round, and the
    median of the per-round ratios (each compares runs minutes apart, so it is the figure least
    moved by one slow spell of a shared machine), and the peak RSS ratio."""
    results = {}
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        results[v] = dict(min(mine, key=lambda r: r["step_s"]), peak_rss_gib=max(r["peak_rss_gib"] for r in mine))
    tok_s = {(r["variant"], r["round"]): r["tok_s"] for r in runs}
    ratios = {}
    base = variants[0]
    for v in variants[1:]:
        per_round = [tok_s[v, k] / tok_s[base, k] for k in range(1, rounds + 1)]
        ratios[v] = {"best": results[v]["tok_s"] / results[base]["tok_s"], "per_round": per_round,
                     "median": statistics.median(per_round),
                     "rss": results[v]["peak_rss_gib"] / results[base]["peak_rss_gib"]}
    return results, ratios


def sft_rows(args, vocab: int):
    """The SFT steps' rows: each pair's prompt with its real response and with its generated one,
    the loss on the response tokens: [(ids, supervised)]."""
    prompts, real, gen, _ = batch_arrays(args, vocab)
    mask = [False] * args.prompt_len + [True] * args.response_len
    return [(p + r, mask) for p, pair in zip(prompts, zip(real, gen)) for r in pair]


def run_jax(args, mode: str) -> dict:
    import jax

    from spin_jax import sharding, train
    from spin_jax.config import TrainSection
    from spin_jax.io.load import load_model

    m = load_model(args.model, remat=args.remat, attn_block=args.attn_block)
    if mode == "sft":
        return run_jax_sft(args, m)
    lora_mode = mode in ("lora", "qlora")
    tcfg = TrainSection(opponent_logps="precomputed" if lora_mode else mode, vocab_chunk=args.vocab_chunk,
                        learning_rate=5e-7)
    mesh = sharding.make_mesh()
    tx, _ = train.make_optimizer(tcfg, 1000, 5e-7)
    extra, opponent = (), None
    if lora_mode:  # the frozen base as the driver builds it (iterate.lora_base), adapters as the state
        from spin_jax.config import Config, LoraSection, ModelSection
        from spin_jax.iterate import lora_base
        from spin_jax.model import lora, transformer

        run_cfg = Config(model=ModelSection(lora=LoraSection(rank=LORA_RANK, alpha=2.0 * LORA_RANK),
                                            base_dtype="nf4" if mode == "qlora" else None))
        opp = lora_base(run_cfg, m)
        cfg, trained = opp.cfg, lora.init_adapters(opp.cfg, lora.DEFAULT_TARGETS, LORA_RANK, jax.random.key(0))
        base = transformer.shard_params(opp.params, cfg, mesh)
        extra, opp, m.params = (base,), None, None  # no host copies left behind
        base_shapes = jax.eval_shape(lambda b: b, base)
    else:
        cfg, trained, base_shapes = m.cfg, m.params, None
    shapes = jax.eval_shape(lambda p: train.init_state(p, tx), trained)
    step = train.make_train_step(cfg, tcfg, tx, mesh, shapes, base_shapes)
    sh = train.state_shardings(cfg, mesh, shapes, tx)
    state = jax.jit(lambda p: train.init_state(p, tx), out_shardings=sh)(jax.device_put(trained, sh.params))
    if mode == "in_step":
        opponent = jax.device_put(m.params, sh.params)
    trained = m.params = None
    b = batch_arrays(args, cfg.vocab_size)[-1]
    batch = train.device_batch(b, mesh, dataclasses.replace(tcfg, grad_accum=args.pairs // args.micro_pairs))
    return _time_steps(lambda s: step(s, opponent, batch, *extra), state, args.steps)


def run_jax_sft(args, m) -> dict:
    import jax

    from spin_jax import sft, sharding, train
    from spin_jax.config import TrainSection

    rows = sft_rows(args, m.cfg.vocab_size)
    tcfg = TrainSection(optimizer="adamw", learning_rate=2e-5, vocab_chunk=args.vocab_chunk,
                        grad_accum=args.pairs // args.micro_pairs)
    mesh = sharding.make_mesh()
    tx, _ = train.make_optimizer(tcfg, 1000, 2e-5)
    objective = sft.SftObjective(m.cfg, tcfg)
    shapes = jax.eval_shape(lambda p: train.init_state(p, tx), m.params)
    step = train.make_train_step(m.cfg, tcfg, tx, mesh, shapes, objective=objective)
    sh = train.state_shardings(m.cfg, mesh, shapes, tx)
    state = jax.jit(lambda p: train.init_state(p, tx), out_shardings=sh)(jax.device_put(m.params, sh.params))
    m.params = None
    width = args.prompt_len + args.response_len
    batch = train.device_batch(sft.make_rows(rows, [[i] for i in range(len(rows))], width), mesh, tcfg, objective)
    return _time_steps(lambda s: step(s, None, batch), state, args.steps)


def _time_steps(step, state, steps: int) -> dict:
    import jax

    t0 = time.perf_counter()
    state, metrics = step(state)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return {"step_s": min(times), "compile_s": first - min(times), "loss": float(metrics["loss"])}


def run_torch_sft(args) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from spin_jax.io.load import resolve_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    d, f = os.path.split(resolve_model_path(args.model))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
    rows = sft_rows(args, model.config.vocab_size)
    ids = torch.tensor([r[0] for r in rows])
    labels = torch.where(torch.tensor([r[1] for r in rows]), ids, torch.full_like(ids, -100))
    n = 2 * args.micro_pairs
    total = int((labels[:, 1:] != -100).sum())

    def step():
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for i in range(0, len(rows), n):  # gradient accumulation: the token mean over the whole step
            logits = model(input_ids=ids[i:i + n]).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[i:i + n, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum") / total
            loss.backward()
            loss_sum += float(loss)
        opt.step()
        return loss_sum

    return _time_torch(step, args.steps)


def _time_torch(step, steps: int) -> dict:
    """A warm-up step, then the fastest of `steps` timed ones."""
    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {"step_s": min(times), "loss": loss}


def run_torch(args) -> dict:
    import copy

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from spin_jax.io.load import resolve_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    d, f = os.path.split(resolve_model_path(args.model))
    policy = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    policy.train()  # dropout is 0 in this config, as in the reference
    opponent = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = torch.optim.RMSprop(policy.parameters(), lr=5e-7)
    from spin_jax.data import tokenize

    prompts, real, gen, _ = batch_arrays(args, policy.config.vocab_size)
    n = args.micro_pairs
    micros = []  # each micro-batch: its n real rows, then its n generated rows (the reference's concatenation)
    for i in range(0, args.pairs, n):
        ps = prompts[i:i + n]
        rows = tokenize.pack(ps + ps, real[i:i + n] + gen[i:i + n], args.prompt_len, args.response_len)
        micros.append({k: torch.from_numpy(v) for k, v in rows.items()})
    beta = 0.1

    def logps(model, b, grad: bool):
        with torch.set_grad_enabled(grad):
            logits = model(input_ids=b["tokens"].long(), attention_mask=b["valid"].long()).logits.float()
            tok = torch.gather(logits.log_softmax(-1), 2, b["labels"].long().unsqueeze(-1)).squeeze(-1)
            return (tok * b["loss_mask"]).sum(-1)

    def step():
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for b in micros:  # gradient accumulation: the mean loss over all pairs
            pi = logps(policy, b, True)
            ref = logps(opponent, b, False)
            z = (pi[:n] - pi[n:]) - (ref[:n] - ref[n:])
            loss = -F.logsigmoid(beta * z).mean() / len(micros)
            loss.backward()
            total += float(loss)
        opt.step()
        return total

    return _time_torch(step, args.steps)


if __name__ == "__main__":
    main()
