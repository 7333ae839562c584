"""`spin-jax` command line: score, sample, generate, train, spin, evaluate, export."""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(2)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError, NotImplementedError) as e:
        if os.environ.get("SPIN_JAX_TRACEBACK"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"spin-jax {args.command}: error: {msg}", file=sys.stderr)
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spin-jax", description=__doc__)
    sub = p.add_subparsers(dest="command")

    s = sub.add_parser("score", help="summed log-probs of responses under a model (teacher-forced)")
    s.add_argument("--model", default="smollm2-135m-instruct",
                   help="smollm2-135m-instruct, a .gguf file, or an HF directory")
    s.add_argument("--input", required=True, help='JSONL rows {"prompt": str, "response": str}')
    s.add_argument("--output", required=True, help='JSONL: each row plus "logp" and "n_tokens"')
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--max-length", type=int, default=2048)
    s.add_argument("--vocab-chunk", type=int, default=0, help="compute logits this many vocab columns at a time")
    s.add_argument("--dtype", default=None, help="compute dtype (default: float32)")
    s.set_defaults(func=cmd_score)
    return p


def cmd_score(args) -> None:
    from spin_jax import scoring
    from spin_jax.io.load import load_model

    rows = scoring.read_jsonl(args.input, required=("prompt", "response"))
    model = load_model(args.model, dtype=args.dtype)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        for row in scoring.score_rows(model, rows, args.batch_size, args.max_length, args.vocab_chunk):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, args.output)
    print(f"wrote {len(rows)} rows to {args.output}")
