"""lm-eval task YAML files that ship with spin_jax (their data beside them): `--tasks spin_local`."""

import os

TASKS_DIR = os.path.dirname(os.path.abspath(__file__))
