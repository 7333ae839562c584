"""Exceptions the command line turns into exit codes (no JAX here)."""

from __future__ import annotations


class Preempted(Exception):
    """SIGTERM reached training; a checkpoint was saved and rerunning the same command resumes."""

    def __init__(self, step: int, directory: str):
        super().__init__(f"SIGTERM: checkpoint {step} saved to {directory}; rerun the same command to resume")
        self.step, self.directory = step, directory
