"""Experiment tracking on Weights & Biases (config `tracking.wandb`; off unless a project is set).

    with tracking.start(cfg, "train iter0") as tr:   # a no-op Tracker when off or not process 0
        tr.update(t, global_step, metrics)          # each update: metrics.jsonl's names
        tr.iteration(t, summary)                    # the iteration's summary
        tr.samples(t, rows)                         # a table of (prompt, real, generated)

Every command of a run (each iteration's training, evaluate, benchmark) continues one W&B run: its
id is kept in runs/<run>/wandb.json and passed with resume="allow". WANDB_MODE, when set, wins
over tracking.wandb.mode. Only process 0 logs. W&B is never a reason for a run to fail: a failed
start or log is one warning line, and tracking is off for the rest of the command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from typing import Iterator, Optional, Sequence

from spin_jax import rundir

log = logging.getLogger(__name__)

WANDB_JSON = "wandb.json"
SAMPLE_ROWS = 16  # rows of each iteration's sample table


class Tracker:
    """A started W&B run, or nothing (`run` None): every method is then a no-op."""

    def __init__(self, run=None):
        self.run = run

    @property
    def on(self) -> bool:
        return self.run is not None

    def update(self, t: int, global_step: int, metrics: dict) -> None:
        """One update's metrics.jsonl row, against the run's global update count."""
        self._log(dict(metrics, iteration=t, global_step=global_step))

    def sft_update(self, label: str, step: int, metrics: dict) -> None:
        """One SFT update's metrics.jsonl row as <label>/* ("sft", "sft_from_iter<t>")."""
        self._log(dict({f"{label}/{k}": v for k, v in metrics.items()}, **{f"{label}/step": step}))

    def iteration(self, t: int, summary: dict) -> None:
        """Iteration t's summary (updates, wall times, first/last-quarter means) as iteration/*."""
        flat = {f"iteration/{k}": v for k, v in rundir.flatten(summary, "/").items() if _scalar(v)}
        self._log(dict(flat, iteration=t))
        self._summary({f"iter{t}/{k[len('iteration/'):]}": v for k, v in flat.items()})

    def evaluation(self, record: dict) -> None:
        """An eval.jsonl record: SPIN's held-out metrics as eval/*, each model's stats as a table."""
        t = record["iteration"]
        self._log(dict({f"eval/{k}": v for k, v in record["spin"].items()}, iteration=t))
        models = record.get("models", {})
        keys = sorted({k for m in models.values() for k, v in m.items() if _scalar(v)})
        self._table(f"eval/models_iter{t}", ["model", *keys],
                    [[label, *(m.get(k) for k in keys)] for label, m in models.items()])

    def benchmark(self, record: dict) -> None:
        """A benchmarks.jsonl record: the task's metric against θk (k = 0 for the base model)."""
        theta = 0 if record.get("iteration") is None else record["iteration"] + 1
        if record.get("value") is not None:
            self._log({f"benchmark/{record['task']}": record["value"], "theta": theta})
        self._summary({f"benchmark/{record['label']}/{record['task']}/{record['metric']}": record.get("value")})

    def benchmark_table(self, records: Sequence[dict]) -> None:
        self._table("benchmark/table", ["model", "theta", "task", "metric", "value", "num_fewshot", "limit"],
                    [[r["label"], 0 if r.get("iteration") is None else r["iteration"] + 1, r["task"], r["metric"],
                      r.get("value"), r.get("num_fewshot"), r.get("limit")] for r in records])

    def samples(self, t: int, rows: Sequence[dict]) -> None:
        """The first SAMPLE_ROWS (prompt, real, generated) rows of iteration t's training data."""
        self._table(f"samples/iter{t}", ["id", "prompt", "real", "generated"],
                    [[r.get("id"), r.get("prompt"), r.get("real"), r.get("generated")]
                     for r in list(rows)[:SAMPLE_ROWS]])

    # -- guarded calls: a W&B failure turns tracking off, with one warning ------------------------

    def _log(self, data: dict) -> None:
        self._call("log", lambda: self.run.log(data))

    def _summary(self, data: dict) -> None:
        self._call("summary", lambda: self.run.summary.update(data))

    def _table(self, key: str, columns: list, data: list) -> None:
        if self.run is None:  # no W&B run: wandb is not imported (half a second)
            return
        import wandb

        self._call("table", lambda: self.run.log({key: wandb.Table(columns=columns, data=data)}))

    def _call(self, what: str, fn) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - tracking must never stop the work it watches
            log.warning(f"W&B {what} failed ({type(e).__name__}: {e}); tracking is off for the rest of this command")
            self.close()

    def close(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            with contextlib.suppress(Exception):
                run.finish()


@contextlib.contextmanager
def start(cfg, job: str) -> Iterator[Tracker]:
    """The run's W&B run for this command (`job` names it in W&B's notes), finished at the end."""
    tracker = Tracker(_init(cfg, job))
    try:
        yield tracker
    finally:
        tracker.close()


def _init(cfg, job: str):
    w = cfg.tracking.wandb
    if not w.project:
        return None
    import jax

    if jax.process_index() != 0:
        return None
    try:
        import wandb

        os.makedirs(cfg.run_dir, exist_ok=True)
        run_id = _run_id(cfg.run_dir, w.project)
        mode = os.environ.get("WANDB_MODE") or w.mode
        run = wandb.init(project=w.project, entity=w.entity, name=w.name or cfg.run_name, id=run_id,
                         resume="allow", config=cfg.to_dict(), dir=cfg.run_dir, mode=mode, job_type=job,
                         settings=wandb.Settings(console="off", init_timeout=60, silent=True))
        run.config.update(cfg.to_dict(), allow_val_change=True)
        run.define_metric("global_step")
        run.define_metric("iteration")
        run.define_metric("theta")
        for pattern, step in (("iteration/*", "iteration"), ("eval/*", "iteration"), ("benchmark/*", "theta")):
            run.define_metric(pattern, step_metric=step)
        for key in ("loss", "rewards/*", "logps/*", "learning_rate", "grad_norm", "skipped", "step"):
            run.define_metric(key, step_metric="global_step")
        log.info(f"W&B: run {run_id} of project {w.project} ({mode}), files in {getattr(run, 'dir', cfg.run_dir)}")
        return run
    except Exception as e:  # noqa: BLE001 - no network, no login, a bad entity: train anyway
        log.warning(f"W&B did not start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                    "the run goes on without it (tracking.wandb, WANDB_MODE=offline to log to files)")
        return None


def _run_id(run_dir: str, project: str) -> str:
    """The W&B run id of this run directory (made once, kept in runs/<run>/wandb.json)."""
    path = os.path.join(run_dir, WANDB_JSON)
    stored = rundir.read_json(path) or {}
    if stored.get("id") and stored.get("project") == project:
        return stored["id"]
    run_id = uuid.uuid4().hex[:12]
    rundir.write_json(path, {"id": run_id, "project": project})
    return run_id


def global_step_offset(run_dir: str, t: int) -> int:
    """Updates of iterations 0 .. t-1 (their summary.json, else metrics.jsonl's last step)."""
    total = 0
    for k in range(t):
        s = rundir.read_json(os.path.join(rundir.iter_dir(run_dir, k), rundir.SUMMARY)) or {}
        steps: Optional[int] = s.get("steps")
        if steps is None:
            hist = rundir.read_metrics(os.path.join(rundir.iter_dir(run_dir, k), rundir.METRICS))
            steps = hist[-1]["step"] if hist else 0
        total += int(steps)
    return total


def _scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
