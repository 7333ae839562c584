"""Exceptions the command line turns into exit codes (no JAX here)."""

from __future__ import annotations

# `spin-jax` exits with this after SIGTERM once training saved a checkpoint: stopped, resumable by
# rerunning the same command (xpk restarts a job on it by default; 0 stays "finished").
EXIT_PREEMPTED = 42


class Preempted(Exception):
    """SIGTERM reached training; a checkpoint was saved and rerunning the same command resumes."""

    def __init__(self, step: int, directory: str):
        super().__init__(f"SIGTERM: checkpoint {step} saved to {directory}; rerun the same command to resume")
        self.step, self.directory = step, directory


class Terminated(Exception):
    """SIGTERM reached a command outside training: what was finished is on disk (sampling chunks,
    answers and scores are written whole), and rerunning the same command resumes."""

    def __init__(self):
        super().__init__("SIGTERM: stopped; finished work is kept, rerun the same command to resume")


class UsageError(ValueError):
    """A command-line flag out of range: the command exits 2 before any work."""


class SpinError(RuntimeError):
    """Work that failed for a reason the message explains: the command exits 1 without a traceback."""


class TooManySkipped(SpinError):
    """Training skipped more updates (non-finite loss or gradients) than train.max_skipped_fraction."""


class NonFiniteParams(SpinError):
    """Parameters with NaN or Inf: never exported or handed on as the next opponent."""


class RunLocked(SpinError):
    """Another process holds the iteration directory."""
