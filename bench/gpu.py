"""GPU benchmark: one call, a few minutes. spin_jax beside PyTorch on the same device, bf16.

For SmolLM2-135M (embedded GGUF weights) and a ~1B random-weight Llama:
  - SPIN train step tokens/s and MFU (6 N tokens/s over the chip's dense bf16 peak), spin_jax with
    precomputed opponent log-probs and with the opponent in the step, beside the PyTorch reference
    step (policy + deep-copied frozen opponent, concatenated forward, RMSprop);
  - sampler tokens/s at batch 64 and achieved HBM bandwidth (weights + KV cache read per decode
    step / step time) against the chip's peak, beside transformers' `generate`.

    bash bench/gpu.sh                 # on a machine with an NVIDIA GPU (writes bench/gpu_results.json)
    python bench/gpu.py --dry         # tiny sizes on CPU: the test suite runs this
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import jax
import numpy as np

# dense bf16 peak FLOP/s and HBM bytes/s by device kind (substring match)
PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12),
         "L4": (121e12, 0.3e12), "v5p": (459e12, 2.76e12), "v5 lite": (197e12, 0.82e12), "v4": (275e12, 1.2e12)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry", action="store_true", help="tiny sizes, any device (CPU tests)")
    ap.add_argument("--out", default="bench/gpu_results.json")
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()
    from spin_jax.cli import enable_compile_cache

    enable_compile_cache()  # a rerun loads the programs it compiled (warm-up only: no timed step compiles)
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": []}
    peak_flops, peak_bw = next((v for k, v in PEAKS.items() if k in results["device"]), (None, None))
    for name, cfg, params, torch_factory in models(args.dry):
        n_params = cfg.num_params()
        s = sizes(args.dry)
        row = {"model": name, "params": n_params}
        row.update(train_jax(cfg, params, s))
        if not args.skip_torch:
            row.update(train_torch(torch_factory, s))
        row.update(sample_jax(cfg, params, s))
        if not args.skip_torch:
            row.update(sample_torch(torch_factory, s))
        for k in ("jax_train_precomputed_tok_s", "jax_train_in_step_tok_s", "torch_train_tok_s"):
            if peak_flops and k in row:
                row[k.replace("tok_s", "mfu")] = 6 * n_params * row[k] / peak_flops
        kv_bytes = 2 * cfg.num_layers * s["gen_batch"] * (s["prompt"] + s["new"]) * cfg.num_kv_heads * cfg.head_dim * 2
        step_bytes = n_params * 2 + kv_bytes
        row["jax_decode_hbm_gb_s"] = step_bytes / row["jax_decode_step_s"] / 1e9
        if peak_bw:
            row["jax_decode_hbm_fraction_of_peak"] = step_bytes / row["jax_decode_step_s"] / peak_bw
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


def sizes(dry: bool) -> dict:
    if dry:
        return dict(pairs=2, prompt=8, response=8, steps=1, gen_batch=2, new=4)
    return dict(pairs=8, prompt=512, response=512, steps=5, gen_batch=64, new=128)


def models(dry: bool):
    from spin_jax.model import transformer
    from spin_jax.model.config import ModelConfig, tiny_config

    if dry:
        cfg = tiny_config("llama", vocab_size=256, dtype="bfloat16")
        yield "tiny", cfg, transformer.init_params(cfg, jax.random.key(0)), lambda: torch_random(cfg)
        return
    from spin_jax.io.load import load_model

    m = load_model("smollm2-135m-instruct", dtype="bfloat16")
    yield "smollm2-135m", m.cfg, m.params, lambda: torch_gguf(m.source)
    cfg = ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                      num_kv_heads=4, head_dim=64, rope_theta=10000.0, dtype="bfloat16", remat="full")
    yield "llama-1.1b-random", cfg, transformer.init_params(cfg, jax.random.key(0)), lambda: torch_random(cfg)


def train_jax(cfg, params, s) -> dict:
    from spin_jax import sharding, train
    from spin_jax.config import TrainSection
    from spin_jax.data import tokenize

    out = {}
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(0)
    pr = [list(rng.integers(3, cfg.vocab_size, s["prompt"])) for _ in range(s["pairs"])]
    rs = [list(rng.integers(3, cfg.vocab_size, s["response"])) for _ in range(2 * s["pairs"])]
    b = tokenize.pack_grouped(pr, rs, s["prompt"], s["response"],  # the training layout
                              opponent_logps=np.full(2 * s["pairs"], -300.0, np.float32))
    tokens = 2 * s["pairs"] * (s["prompt"] + s["response"])
    for mode in ("precomputed", "in_step"):
        tcfg = TrainSection(opponent_logps=mode, vocab_chunk=8192)
        tx, _ = train.make_optimizer(tcfg, 1000, 5e-7)
        shapes = jax.eval_shape(lambda p: train.init_state(p, tx), params)
        sh = train.state_shardings(cfg, mesh, shapes, tx)
        state = jax.jit(lambda p: train.init_state(p, tx), out_shardings=sh)(jax.device_put(params, sh.params))
        opp = jax.device_put(params, sh.params) if mode == "in_step" else None
        step = train.make_train_step(cfg, tcfg, tx, mesh, shapes)
        batch = train.device_batch(b, mesh, tcfg)
        state, m = step(state, opp, batch)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(s["steps"]):
            state, m = step(state, opp, batch)
        jax.block_until_ready(m)
        out[f"jax_train_{mode}_tok_s"] = tokens * s["steps"] / (time.perf_counter() - t0)
        del state, opp
    return out


def sample_jax(cfg, params, s) -> dict:
    from spin_jax.sampling import Sampler, SamplingParams

    sampler = Sampler(cfg, batch_size=s["gen_batch"], min_prompt_bucket=s["prompt"])
    placed = sampler.place(params)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(3, cfg.vocab_size, s["prompt"])) for _ in range(s["gen_batch"])]
    sp = SamplingParams(max_new_tokens=s["new"], temperature=1.0)
    sampler.generate(placed, prompts, sp, seed=0)
    t0 = time.perf_counter()
    sampler.generate(placed, prompts, sp, seed=1)
    dt = time.perf_counter() - t0
    return {"jax_sample_tok_s": s["gen_batch"] * s["new"] / dt, "jax_decode_step_s": dt / s["new"]}


def torch_random(cfg):
    import torch
    import transformers

    torch.manual_seed(0)
    c = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                 intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                                 num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                                 head_dim=cfg.head_dim, tie_word_embeddings=cfg.tie_embeddings)
    return transformers.LlamaForCausalLM(c).to(_torch_device(), torch.bfloat16)


def torch_gguf(path: str):
    import os

    import torch
    from transformers import AutoModelForCausalLM

    d, f = os.path.split(path)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.bfloat16).to(_torch_device())


def train_torch(factory, s) -> dict:
    import torch
    import torch.nn.functional as F

    policy = factory()
    policy.gradient_checkpointing_enable()
    policy.train()
    opponent = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = torch.optim.RMSprop(policy.parameters(), lr=5e-7)
    dev = policy.device
    n, length = s["pairs"], s["prompt"] + s["response"]
    ids = torch.randint(3, policy.config.vocab_size, (2 * n, length), device=dev)
    mask = torch.zeros_like(ids, dtype=torch.float32)
    mask[:, s["prompt"]:] = 1

    def logps(model):
        logits = model(input_ids=ids).logits[:, :-1].float()
        tok = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return (tok * mask[:, 1:]).sum(-1)

    def step():
        opt.zero_grad(set_to_none=True)
        pi = logps(policy)
        with torch.no_grad():
            ref = logps(opponent)
        z = (pi[:n] - pi[n:]) - (ref[:n] - ref[n:])
        (-F.logsigmoid(0.1 * z).mean()).backward()
        opt.step()

    step()
    _sync()
    t0 = time.perf_counter()
    for _ in range(s["steps"]):
        step()
    _sync()
    return {"torch_train_tok_s": 2 * n * length * s["steps"] / (time.perf_counter() - t0)}


def sample_torch(factory, s) -> dict:
    import torch

    model = factory().eval()
    ids = torch.randint(3, model.config.vocab_size, (s["gen_batch"], s["prompt"]), device=model.device)
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=s["new"],
              min_new_tokens=s["new"], pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **kw)
        _sync()
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        _sync()
    return {"torch_generate_tok_s": s["gen_batch"] * s["new"] / (time.perf_counter() - t0)}


def _torch_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
