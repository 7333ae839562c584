"""A self-contained Markdown report of a run directory, with PNG plots (matplotlib, Agg).

    write_report("runs/smollm2_sharegpt")          # -> runs/smollm2_sharegpt/report/report.md

It reads, for every runs/<run>/iter<t>/: metrics.jsonl (training curves), config.json (settings),
summary.json (updates, wall times), synthetic/ (the store's digest), runs/<run>/eval.jsonl
(held-out metrics, written by `spin-jax evaluate`) and runs/<run>/benchmarks.jsonl (lm-eval tasks,
written by `spin-jax benchmark`: the paper's table, a row per model). The output directory holds report.md and the
PNGs it links by relative name, so it can be copied and read offline. Each figure is
FIGSIZE x DPI = 1200 x 700 pixels.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from typing import Optional

import numpy as np

from spin_jax import rundir
from spin_jax.errors import UsageError

TRAIN_KEYS = ("loss", "rewards/real", "rewards/generated", "rewards/margins", "rewards/accuracies")
FIGSIZE, DPI = (12.0, 7.0), 100
TRAIN_PNG, HELDOUT_PNG, BENCH_PNG = "train_curves.png", "heldout.png", "benchmarks.png"
REPORT_FILES = {"report.md", TRAIN_PNG, HELDOUT_PNG, BENCH_PNG}


def write_report(run_dir: str, out_dir: str | None = None) -> str:
    """Render report.md and its PNGs into out_dir (default run_dir/report); returns report.md's path."""
    iters = rundir.iterations(run_dir)
    out_dir = os.path.join(run_dir, "report") if out_dir is None else out_dir
    check_report_dir(out_dir, run_dir)
    info = {t: iteration_info(run_dir, t) for t in iters}
    evals = rundir.latest_evals(run_dir)
    bench = rundir.read_benchmarks(os.path.join(run_dir, rundir.BENCHMARKS))
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp", dir=parent)
    try:  # a fresh directory of our own, then it replaces the previous report whole
        figures = []
        if any(i["metrics"] for i in info.values()):
            plot_training(info, os.path.join(tmp, TRAIN_PNG))
            figures.append(TRAIN_PNG)
        if evals:
            plot_heldout(evals, os.path.join(tmp, HELDOUT_PNG))
            figures.append(HELDOUT_PNG)
        if bench:
            plot_benchmarks(bench, os.path.join(tmp, BENCH_PNG))
            figures.append(BENCH_PNG)
        text = render_markdown(run_dir, info, evals, figures, bench)
        study = os.path.join(run_dir, "study")
        if os.path.exists(os.path.join(study, "study.md")):  # a study's run: its section, its plot beside it
            with open(os.path.join(study, "study.md"), encoding="utf-8") as f:
                body = f.read().split("\n", 1)[1]  # its own title goes
            text += "\n## Study: SPIN against SFT\n\n" + body.replace("\n## ", "\n### ")
            for name in os.listdir(study):
                if name.endswith(".png"):
                    shutil.copyfile(os.path.join(study, name), os.path.join(tmp, name))
        rundir.atomic_write(os.path.join(tmp, "report.md"), text)
        if os.path.isdir(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.old", dir=parent)
            os.replace(out_dir, os.path.join(old, "report"))  # a report of ours (check_report_dir)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(out_dir, "report.md")


def check_report_dir(out_dir: str, run_dir: str) -> None:
    """The output directory is new, empty, or an earlier report (only the files a report writes);
    anything else is refused before any work."""
    if os.path.isdir(out_dir) and not os.path.islink(out_dir):
        extra = set(os.listdir(out_dir)) - REPORT_FILES
        if extra:
            raise UsageError(f"--out {out_dir} holds files a report does not write ({', '.join(sorted(extra)[:3])}); "
                             "choose a new directory")
        return
    iteration_dirs = [rundir.iter_dir(run_dir, t) for t in rundir.iterations(run_dir)]
    rundir.check_new_dir(out_dir, "--out", protect=iteration_dirs)


def iteration_info(run_dir: str, t: int) -> dict:
    d = rundir.iter_dir(run_dir, t)
    store = rundir.store_info(run_dir, t) or {}
    return {"metrics": rundir.read_metrics(os.path.join(d, rundir.METRICS)),
            "config": rundir.read_json(os.path.join(d, rundir.CONFIG)),
            "summary": rundir.read_json(os.path.join(d, rundir.SUMMARY)),
            "digest": store.get("digest"), "rows": store.get("rows"), "expected": store.get("expected"),
            "trained": rundir.is_trained(run_dir, t)}


# ----------------------------------------------------------------------------------------------
# plots


def plot_training(info: dict, path: str) -> None:
    """Per-update training metrics, one line per iteration, x = update within the iteration."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=FIGSIZE, dpi=DPI)
    panels = [(k,) for k in TRAIN_KEYS] + [("logps/real", "logps/generated")]
    for ax, keys in zip(axes.flat, panels):
        for t, i in info.items():
            if not i["metrics"]:
                continue
            steps = [m["step"] for m in i["metrics"]]
            for key, style in zip(keys, ("-", "--")):
                ax.plot(steps, [m.get(key, np.nan) for m in i["metrics"]], style, color=f"C{t % 10}",
                        label=f"iter{t}" + (f" {key.split('/')[1]}" if len(keys) > 1 else ""))
        ax.set_title(" / ".join(keys) + (" (solid / dashed)" if len(keys) > 1 else ""), fontsize=10)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    axes.flat[-1].legend(fontsize=7)
    fig.suptitle("SPIN training curves (per update, one line per iteration)")
    _save(fig, path)


def plot_heldout(evals: dict[int, dict], path: str) -> None:
    """Held-out SPIN metrics across iterations, and per-model log-probs and sample lengths."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=FIGSIZE, dpi=DPI)
    its = list(evals)
    spin = lambda key: [evals[t]["spin"][key] for t in its]  # noqa: E731
    ax = axes[0, 0]
    ax.plot(its, spin("rewards/real"), "o-", label="real")
    ax.plot(its, spin("rewards/generated"), "s--", label="generated")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_title("held-out rewards θ(t+1) vs θt", fontsize=10)
    ax.legend(fontsize=8)
    for ax, key in ((axes[0, 1], "rewards/margins"), (axes[0, 2], "rewards/accuracies")):
        ax.plot(its, spin(key), "o-", color="C2")
        ax.set_title(f"held-out {key}", fontsize=10)
    axes[0, 2].set_ylim(-0.05, 1.05)
    for ax in axes[0]:
        ax.set_xlabel("iteration t")
        ax.set_xticks(its)
    models = model_table(evals)
    labels = list(models)
    x = np.arange(len(labels))
    col = lambda key: [models[m][key] for m in labels]  # noqa: E731
    axes[1, 0].plot(x, col("logp_per_token"), "o-", color="C3")
    axes[1, 0].set_title("held-out real responses: log-prob per token", fontsize=10)
    axes[1, 1].plot(x, col("gen_len_mean"), "o-", label="mean")
    axes[1, 1].plot(x, col("gen_len_median"), "s--", label="median")
    axes[1, 1].plot(x, col("gen_len_max"), "^:", label="max")
    axes[1, 1].set_title("generated length (tokens)", fontsize=10)
    axes[1, 1].legend(fontsize=8)
    axes[1, 2].bar(x, col("eos_share"), color="C4")
    axes[1, 2].set_ylim(0, 1.05)
    axes[1, 2].set_title("share of samples ended by end-of-turn", fontsize=10)
    for ax in axes[1]:
        ax.set_xticks(x, labels)
        ax.set_xlabel("model (base = θ0, iter<k> = θ(k+1))")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle("SPIN held-out evaluation")
    _save(fig, path)


def plot_benchmarks(records: list[dict], path: str) -> None:
    """The benchmark average (higher-is-better metrics) against the iteration, and each task's
    metric: x = 0 for the base model θ0, k + 1 for iteration k's model θ(k+1)."""
    plt = _pyplot()
    columns, rows = benchmark_table(records)
    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
    x = [0 if it is None else it + 1 for _, it, _ in rows]
    labels = [label for label, _, _ in rows]
    avg = [average(cells) for _, _, cells in rows]
    axes[0].plot(x, [np.nan if a is None else a for a in avg], "o-", color="C0")
    axes[0].set_title("benchmark average (higher-is-better metrics)", fontsize=10)
    right = None  # lower-is-better metrics (perplexities) on their own axis
    for k, task in enumerate(columns):
        ys = [cells[task]["value"] if task in cells and cells[task]["value"] is not None else np.nan
              for _, _, cells in rows]
        higher = next((cells[task].get("higher_is_better", True) for _, _, cells in rows if task in cells), True)
        if not higher and right is None:
            right = axes[1].twinx()
        (axes[1] if higher else right).plot(x, ys, "o-" if higher else "s--", color=f"C{k % 10}",
                                            label=task + ("" if higher else " (lower is better, right axis)"))
    axes[1].set_title("per task (the table's metric)", fontsize=10)
    handles = [h for ax in (axes[1], right) if ax is not None for h in ax.get_legend_handles_labels()[0]]
    axes[1].legend(handles=handles, fontsize=8)
    for ax in axes:
        ax.set_xticks(x, [f"{label}\nθ{i}" for label, i in zip(labels, x)])
        ax.set_xlabel("model")
        ax.grid(alpha=0.3)
    fig.suptitle("lm-eval benchmarks per SPIN iteration")
    _save(fig, path)


def benchmark_table(records: list[dict]) -> tuple[list[str], list[tuple[str, int | None, dict]]]:
    """The newest record of each (model, task) as (columns, rows): columns are the tasks in
    first-seen order, rows (label, iteration, {task: record}) ordered base, iter0, iter1, …"""
    columns: list[str] = []
    cells: dict[str, dict] = {}
    iteration: dict[str, int | None] = {}
    for r in records:
        if r["task"] not in columns:
            columns.append(r["task"])
        cells.setdefault(r["label"], {})[r["task"]] = r
        iteration[r["label"]] = r.get("iteration")
    order = sorted(cells, key=lambda label: -1 if iteration[label] is None else iteration[label])
    return columns, [(label, iteration[label], cells[label]) for label in order]


def average(cells: dict) -> float | None:
    """The mean of a row's higher-is-better metrics (the paper's Average); None if it has none."""
    values = [r["value"] for r in cells.values() if r.get("higher_is_better", True) and r.get("value") is not None]
    return float(np.mean(values)) if values else None


def benchmarks_markdown(records: list[dict], mt: Optional[tuple[str, dict]] = None) -> str:
    """The paper's table: a row per model, a column per task (its metric, shots) and the average;
    with `mt` (judge, {model id: MT-Bench scores}) the MT-Bench average too (1-10, not averaged in)."""
    columns, rows = benchmark_table(records)
    if mt:
        known = {label for label, _, _ in rows}
        rows += [(label, None, {}) for label in mt[1] if label not in known]
    head = ["model"]
    for task in columns:
        r = next(cells[task] for _, _, cells in rows if task in cells)
        shots = r.get("n_shot") if r.get("n_shot") is not None else r.get("num_fewshot")
        head.append(f"{task} ({r['metric'].split(',')[0]}{'' if shots is None else f', {shots}-shot'}"
                    f"{'' if r.get('higher_is_better', True) else ', lower is better'})")
    body = [[label, *(_with_stderr(cells[task]) if task in cells else "—" for task in columns),
             _value(average(cells))] for label, _, cells in rows]
    head.append("average")
    if mt:
        head.append(f"MT-Bench ({mt[0]}, 1-10)")
        body = [row + [_value((mt[1].get(row[0]) or {}).get("average"))] for row in body]
    out = table(head, body)
    notes = data_notes(records)
    if any(r.get("stderr") is not None for r in records):
        out += "\n\n± is lm-eval's standard error of the mean over the task's documents."
    return out + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


def _with_stderr(r: dict) -> str:
    s = r.get("stderr")
    return _value(r["value"]) + (f" ± {s:.4f}" if s is not None and s == s else "")


def data_note(task: str, d: Optional[dict]) -> Optional[str]:
    """Where a task's data came from when it was not lm-eval's own from the Hub (benchmark_data's
    note), as one line; None otherwise."""
    d = d or {}
    if d.get("source") == "packaged":
        return f"{task}: data from {d['package']} ({d['copy']})" + "".join(f"; {x}" for x in d.get("notes", []))
    if d.get("source") == "hub cache":
        return f"{task}: data loaded offline (the Hub's cache or the task's local files)"
    return None


def data_notes(records: list[dict]) -> list[str]:
    """data_note of each task of the table (its newest record), the task's name as code."""
    seen = {r["task"]: data_note(f"`{r['task']}`", r.get("data")) for r in records}
    return [line for line in seen.values() if line]


def model_table(evals: dict[int, dict]) -> dict[str, dict]:
    """Per-model held-out stats, each from the newest evaluation that includes the model."""
    out = {}
    for t in sorted(evals):
        out.update(evals[t]["models"])
    return dict(sorted(out.items(), key=lambda kv: -1 if kv[0] == "base" else int(kv[0][4:])))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    with rundir.atomic_file(path) as f:
        fig.savefig(f, dpi=DPI, format="png")  # no bbox_inches="tight": the size stays FIGSIZE x DPI
    _pyplot().close(fig)


# ----------------------------------------------------------------------------------------------
# Markdown


def render_markdown(run_dir: str, info: dict, evals: dict, figures: list[str], bench: list[dict] = ()) -> str:
    its = list(info)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out = [f"# SPIN run report: `{os.path.basename(os.path.normpath(run_dir))}`", "",
           f"Run directory `{run_dir}`, {len(its)} iteration(s); generated {now} by `spin-jax report`.", "",
           "Iteration t trains θ(t+1) from θt against θt (the opponent) on real vs θt-sampled responses. "
           "The paper's trend: the real reward rises, the generated reward falls, the margin grows.", ""]
    out += ["## Training", ""]
    if TRAIN_PNG in figures:
        out += [f"![training curves]({TRAIN_PNG})", ""]
    else:
        out += ["No metrics.jsonl yet: run `make train ITER=0`.", ""]
    rows = []
    for t in its:
        f, l, note = quarters(info[t])
        rows.append([f"iter{t}{note}"] + [f"{f[k]:.4f} → {l[k]:.4f}" if k in f and k in l else "—"
                                          for k in TRAIN_KEYS])
    out += ["Mean over the first → last 25% of updates (summary.json; metrics.jsonl while a run is unfinished):",
            "", table(["iteration", *TRAIN_KEYS], rows), ""]

    out += ["## Held-out evaluation", ""]
    if evals:
        out += [f"![held-out metrics]({HELDOUT_PNG})", ""]
        rows = []
        for t, e in evals.items():
            s = e["spin"]
            rows.append([f"iter{t} (θ{t + 1} vs θ{t})", e.get("num_prompts", "—"),
                         *(f"{s[k]:.4f}" if k in s else "—" for k in TRAIN_KEYS), e.get("time", "—")])
        out += [table(["iteration", "prompts", *TRAIN_KEYS, "evaluated"], rows), ""]
        rows = [[label, f"{m['logp_per_token']:.4f}", f"{m['gen_len_mean']:.1f}", f"{m['gen_len_median']:.1f}",
                 m["gen_len_max"], f"{m['eos_share']:.2f}", f"`{m.get('path', '')}`"]
                for label, m in model_table(evals).items()]
        out += ["Per model (held-out real responses' mean log-prob per token; its own samples' lengths):", "",
                table(["model", "logp/token", "len mean", "len median", "len max", "ended by EOS", "path"],
                      rows), ""]
        latest = evals[max(evals)]
        es = latest.get("settings", {})
        out += [f"Held-out prompts: `{es.get('eval_split', '?')}` of `{es.get('data', '?')}`, "
                f"{latest.get('num_prompts')} prompts (ids sha256 `{latest.get('prompt_ids_sha256', '?')}`), "
                f"sampling {json.dumps(es.get('sampling', {}))}.", ""]
        out += samples_section(latest.get("samples"))
    else:
        out += ["No eval.jsonl yet: run `make evaluate ITER=t` for a trained iteration t.", ""]

    out += ["## Benchmarks", ""]
    from spin_jax import mt_bench

    judged = mt_bench.run_scores(run_dir)
    mt = next(iter(sorted(judged.items(), key=lambda kv: not kv[0].startswith("gpt-4"))), None)
    if bench or mt:
        limited = sorted({r["task"] for r in bench if r.get("limit")})
        out += ([f"![benchmarks]({BENCH_PNG})", ""] if bench else []) + [
                "lm-evaluation-harness tasks on spin_jax's programs (`spin-jax benchmark`), the newest score of each "
                "model and task; the average is over the higher-is-better columns"
                + (" (MT-Bench, `spin-jax mt-bench`, is apart: its own 1-10 scale)" if mt else "") + ":", "",
                benchmarks_markdown(bench, mt), ""]
        for judge_name, s in judged.items():
            out += [mt_bench.markdown(s, judge_name), ""]
        if limited:
            out += [f"Scored on a --limit of their documents (a quick look, not a score): {', '.join(limited)}.", ""]
    else:
        out += ["No benchmarks.jsonl yet: run `make benchmark ITER=t TASKS=open_llm` (or `TASKS=spin_local`, offline).",
                ""]

    out += ["## Data and wall times", ""]
    rows = []
    for t in its:
        i, s = info[t], info[t]["summary"] or {}
        rows.append([f"iter{t}", f"`{i['digest']}`" if i["digest"] else "no store",
                     f"{i['rows']}/{i['expected']}" if i["rows"] is not None else "—",
                     s.get("steps", "—"), s.get("skipped_updates", "—"), _secs(s.get("train_seconds")),
                     _secs(s.get("wall_seconds")), _secs(evals.get(t, {}).get("wall_seconds")),
                     "yes" if i["trained"] else "no (unfinished)"])
    out += [table(["iteration", "synthetic store digest (sha256)", "rows/expected", "updates", "skipped",
                   "train", "total", "evaluate", "model"], rows), ""]

    out += ["## Settings", "", "Each iteration's recorded config (iter<t>/config.json).", ""]
    flat = {t: rundir.flatten(info[t]["config"] or {}) for t in its}
    keys = sorted({k for f in flat.values() for k in f} - {"iteration"})
    if keys:
        rows = [[f"`{k}`", *(flat[t].get(k, "—") for t in its)] for k in keys]
        out += [table(["setting", *(f"iter{t}" for t in its)], rows), ""]
    else:
        out += ["No iter<t>/config.json yet.", ""]
    return "\n".join(out)


def quarters(i: dict) -> tuple[dict, dict, str]:
    """Means over the first and last 25% of updates: the summary's, else from metrics.jsonl."""
    s = i["summary"] or {}
    if "first_quarter" in s:
        return s["first_quarter"], s.get("last_quarter", {}), ""
    hist = i["metrics"]
    if not hist:
        return {}, {}, ""
    first, last = rundir.quarter_means(hist, TRAIN_KEYS)
    return first, last, f" (unfinished, {len(hist)} updates so far)"


def samples_section(path: str | None, n_prompts: int = 2, max_chars: int = 400) -> list[str]:
    """The first prompts of the newest eval_samples.jsonl, with each model's response."""
    if not path or not os.path.exists(path):
        return []
    out = [f"Sample responses (first {n_prompts} held-out prompts of `{path}`, cut at {max_chars} characters):", ""]
    with open(path, encoding="utf-8") as f:
        for k, line in enumerate(f):
            if k == n_prompts:
                break
            row = json.loads(line)
            out += [f"**Prompt {k + 1}** (`{row['id']}`):", "", _block(row["prompt"], max_chars),
                    "", "*real:*", "", _block(row["real"], max_chars), ""]
            for label, r in row["responses"].items():
                out += [f"*{label}* ({r['n_tokens']} tokens, {r['finish_reason']}):", "",
                        _block(r["text"], max_chars), ""]
    return out


def table(header: list, rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(_cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, (list, tuple)):
        v = ", ".join(map(str, v))
    return str(v).replace("|", "\\|").replace("\n", " ")


def _block(text: str, max_chars: int) -> str:
    text = text if len(text) <= max_chars else text[:max_chars] + " …"
    return "\n".join("    " + line for line in (text or "(empty)").replace("\t", "  ").splitlines() or [""])


def _value(v) -> str:
    return "—" if v is None else f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"


def _secs(s) -> str:
    return "—" if s is None else f"{s:.0f}s"
