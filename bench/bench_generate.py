"""Sampler throughput: spin_jax's jitted sampler vs transformers' PyTorch `generate`, one run.

Same model (SmolLM2-135M-Instruct from the embedded GGUF, fp32), same chat prompts (ShareGPT's
first user turns), 128 new tokens forced (EOS ignored), sampling at temperature 1, at each batch
size. Prints tokens/s of both, the ratio, and our compile time apart from the steady state.

    make bench-generate                      # batch 16 and 64
    python bench/bench_generate.py --batches 16 64 --new-tokens 128 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--max-prompt-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="steady-state runs per setting (best is kept)")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from spin_jax.io.load import load_model
    from spin_jax.sampling import Sampler, SamplingParams

    model = load_model(args.model)
    tok = model.tokenizer
    prompts = chat_prompts(tok, max(args.batches), args.max_prompt_tokens)
    sp = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0, stop_ids=())
    hf = None if args.skip_torch else torch_model(model.source)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
          f"{len(jax.devices())} device(s); {args.new_tokens} new tokens forced, T=1")
    results = []
    for b in args.batches:
        batch = prompts[:b]
        sampler = Sampler(model.cfg, batch_size=b, pad_id=tok.pad_token_id or 0)
        params = sampler.place(model.params)
        t0 = time.perf_counter()
        sampler.generate(params, batch, sp, seed=0)
        first = time.perf_counter() - t0
        steady = min(_timed(lambda s=s: sampler.generate(params, batch, sp, seed=s))
                     for s in range(1, args.repeats + 1))
        ours = b * args.new_tokens / steady
        row = {"batch": b, "jax_tok_s": ours, "jax_steady_s": steady, "jax_compile_s": first - steady}
        if hf is not None:
            t_hf = min(_timed(lambda: torch_generate(hf, tok, batch, args.new_tokens))
                       for _ in range(args.repeats))
            row.update(torch_tok_s=b * args.new_tokens / t_hf, torch_s=t_hf, ratio=ours * t_hf / (b * args.new_tokens))
        results.append(row)
        line = f"batch {b:3d}: spin_jax {ours:7.1f} tok/s (steady {steady:.2f}s, compile {first - steady:.1f}s)"
        if hf is not None:
            line += (f" | transformers generate {row['torch_tok_s']:7.1f} tok/s ({t_hf:.2f}s)"
                     f" | ratio {row['ratio']:.2f}x")
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def chat_prompts(tok, n: int, max_tokens: int) -> list[list[int]]:
    """The first n ShareGPT first-user-turns whose templated prompt fits max_tokens."""
    from spin_jax.data import sources, tokenize

    out = []
    for row in sources.iter_sharegpt():
        ids = tokenize.prompt_ids(tok, row["prompt"])
        if len(ids) <= max_tokens:
            out.append(ids)
        if len(out) == n:
            return out
    raise RuntimeError(f"only {len(out)} prompts fit {max_tokens} tokens")


def torch_model(gguf_path: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    d, f = os.path.split(gguf_path)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()


def torch_generate(hf, tok, prompts: list[list[int]], new_tokens: int):
    import torch

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tok.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                          top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          pad_token_id=tok.pad_token_id)
    assert out.shape[1] == width + new_tokens
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
