#!/usr/bin/env python3
"""Run spin_jax on a Cloud TPU VM or pod slice with gcloud: create, install, run, copy, delete.

    S="--name spin --zone us-central2-b --project my-proj"
    python launch/tpu_pod.py create  $S [--accelerator-type v4-8] [--spot]
    python launch/tpu_pod.py install $S --repo https://github.com/ORG/spin_jax.git
    python launch/tpu_pod.py run     $S --iter 0 [--config C] [--set k=v ...]
    python launch/tpu_pod.py run     $S --target spin --iters 3
    python launch/tpu_pod.py copy    $S [--run RUN] [--runs-dir gs://bucket/runs] [--dest DIR]
    python launch/tpu_pod.py delete  $S --yes

Every subcommand takes --dry-run (print the commands, run nothing; gcloud need not be
installed). --name/--zone/--project may also come from SPIN_TPU_NAME, SPIN_TPU_ZONE and
SPIN_TPU_PROJECT. `install` and `run` go to every worker (--worker=all) and stream their output;
`copy` reads from worker 0. On a multi-host slice, runs_dir must be a file system that every
worker sees (a Filestore NFS share or a gcsfuse mount), since each host writes its own shards and
reads everyone's.

Only the Python standard library is used, so this runs from any machine with gcloud.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

DEFAULT_ACCELERATOR = "v4-8"  # one host, 4 chips (8 TensorCores, 32 GiB HBM each chip)
# TPU VM software versions per generation (cloud.google.com/tpu/docs/runtimes)
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
            "v6e": "v2-alpha-tpuv6e"}
LIBTPU_RELEASES = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
SETTINGS = {"name": ("SPIN_TPU_NAME", "the TPU VM's name, e.g. spin-v4"),
            "zone": ("SPIN_TPU_ZONE", "its zone, e.g. us-central2-b"),
            "project": ("SPIN_TPU_PROJECT", "the Google Cloud project id")}


class LaunchError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.command:
        build_parser().print_help()
        return 2
    try:
        resolve_settings(args)
        commands = COMMANDS[args.command](args)
        if args.command == "delete" and not args.dry_run:
            confirm_delete(args)
        return execute(commands, args.dry_run)
    except LaunchError as e:
        print(f"tpu_pod.py {args.command}: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--name", help="TPU VM name (or env SPIN_TPU_NAME)")
    common.add_argument("--zone", help="zone, e.g. us-central2-b (or env SPIN_TPU_ZONE)")
    common.add_argument("--project", help="Google Cloud project id (or env SPIN_TPU_PROJECT)")
    common.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    common.add_argument("--repo-dir", default="spin_jax",
                        help="the checkout on each worker, relative to the home directory (default spin_jax)")

    p = argparse.ArgumentParser(prog="tpu_pod.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="command")

    def add(name: str, helptext: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], allow_abbrev=False, help=helptext)

    s = add("create", "create the TPU VM / pod slice")
    s.add_argument("--accelerator-type", default=DEFAULT_ACCELERATOR,
                   help=f"e.g. v4-8, v4-64, v5litepod-8, v5p-32 (default {DEFAULT_ACCELERATOR})")
    s.add_argument("--version", help="TPU software version (default: the generation's base image, "
                   + ", ".join(f"{k}: {v}" for k, v in RUNTIMES.items()) + ")")
    s.add_argument("--spot", action="store_true", help="a Spot VM: cheaper, may be preempted (default off)")

    s = add("install", "clone the repo and build its venv on every worker")
    s.add_argument("--repo", default=os.environ.get("SPIN_TPU_REPO"),
                   help="git URL to clone (or env SPIN_TPU_REPO; default: this checkout's origin)")
    s.add_argument("--ref", default="main", help="branch, tag or commit to check out (default main)")
    s.add_argument("--python", default="python3.11", help="interpreter for the venv; installed from "
                   "the deadsnakes PPA if missing (default python3.11)")
    s.add_argument("--jax-version", default=None,
                   help="jax[tpu] version (default: the jax pin of requirements.txt)")

    s = add("run", "run `make train|generate|spin|evaluate|benchmark` on every worker")
    s.add_argument("--target", choices=("train", "generate", "spin", "evaluate", "benchmark"), default="train")
    s.add_argument("--iter", type=int, default=0, help="iteration for train/generate/evaluate/benchmark (default 0)")
    s.add_argument("--tasks", default=None, help="for benchmark: lm-eval tasks or a preset, e.g. open_llm")
    s.add_argument("--iters", type=int, default=2, help="iterations for spin (default 2)")
    s.add_argument("--config",
                   help="config file in the repo (default: the Makefile's, configs/cpu_default.yaml)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override passed on to spin-jax (repeatable); distributed.coordinator_address "
                        "is set to auto (JAX finds the slice's workers) unless overridden here")
    s.add_argument("--worker", default="all", help="which workers (default all)")

    s = add("copy", "copy a run directory back from worker 0 (or GCS)")
    s.add_argument("--runs-dir", default="runs", help="runs_dir of the run: relative to the checkout, "
                   "absolute, or gs://bucket/path (default runs)")
    s.add_argument("--run", help="one run's name (default: the whole runs dir)")
    s.add_argument("--dest", default="tpu_runs", help="local destination directory (default tpu_runs)")

    s = add("delete", "delete the TPU VM (asks, unless --yes)")
    s.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    s = add("ssh", "run any shell command on the workers")
    s.add_argument("--command", dest="remote_command", required=True)
    s.add_argument("--worker", default="all")

    add("status", "describe the TPU VM")
    return p


# ----------------------------------------------------------------------------------------------
# the gcloud commands of each subcommand


def cmd_create(args) -> list[list[str]]:
    accel = args.accelerator_type
    version = args.version or runtime_for(accel)
    cmd = gcloud_tpu(args, "create", args.name, "--accelerator-type", accel, "--version", version)
    return [cmd + (["--spot"] if args.spot else [])]


def cmd_install(args) -> list[list[str]]:
    repo = args.repo or origin_url()
    if not repo:
        raise LaunchError("no repository to clone: pass --repo URL (or set SPIN_TPU_REPO)")
    jax_version = args.jax_version or pinned("jax")
    d, py, q = args.repo_dir, args.python, shlex.quote
    script = " && ".join([
        f"({q(py)} -c \"import ensurepip\" 2>/dev/null || "
        f"(sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get update -qq && "
        f"sudo apt-get install -y -qq {q(py)} {q(py + '-venv')}))",
        f"(test -d {q(d)}/.git || git clone -q {q(repo)} {q(d)})",
        f"cd {q(d)}",
        f"git fetch -q origin {q(args.ref)}",
        "git checkout -q FETCH_HEAD",
        f"make venv PYTHON={q(py)}",
        f".venv/bin/pip install -q \"jax[tpu]=={jax_version}\" -f {LIBTPU_RELEASES}",
        ".venv/bin/python -c \"import jax; print(jax.__version__)\"",
    ])
    return [gcloud_ssh(args, "all", script)]


def cmd_run(args) -> list[list[str]]:
    make = ["make", args.target]
    make.append(f"ITERS={args.iters}" if args.target == "spin" else f"ITER={args.iter}")
    if args.tasks:
        if args.target != "benchmark" or not re.fullmatch(r"[\w,.-]+", args.tasks):
            raise LaunchError(f"--tasks {args.tasks!r}: goes with --target benchmark, as comma-separated task names")
        make.append(f"TASKS={args.tasks}")
    if args.config:
        make.append(f"CONFIG={shlex.quote(args.config)}")
    # every worker joins one JAX process group; JAX finds the workers itself on a TPU VM slice
    overrides = ["distributed.coordinator_address=auto", *args.set]
    for o in overrides:
        if "=" not in o or re.search(r"[\s\"'`$\\]", o):
            raise LaunchError(f"--set {o!r}: expected KEY=VALUE without spaces, quotes, $ or backslashes")
    make.append('ARGS="' + " ".join(f"--set {o}" for o in overrides) + '"')
    return [gcloud_ssh(args, args.worker, f"cd {shlex.quote(args.repo_dir)} && {' '.join(make)}")]


def cmd_copy(args) -> list[list[str]]:
    suffix = f"/{args.run}" if args.run else ""
    if args.runs_dir.startswith("gs://"):  # a bucket (e.g. gcsfuse-mounted as runs_dir on the workers)
        dest = os.path.join(args.dest, args.run) if args.run else args.dest
        src = args.runs_dir.rstrip("/") + suffix
        return [["mkdir", "-p", dest], ["gsutil", "-m", "rsync", "-r", src, dest]]
    runs = args.runs_dir if os.path.isabs(args.runs_dir) else f"{args.repo_dir}/{args.runs_dir}"
    src = f"{args.name}:{runs.rstrip('/')}{suffix}"
    return [["mkdir", "-p", args.dest], gcloud_tpu(args, "scp", "--recurse", "--worker=0", src, args.dest)]


def cmd_delete(args) -> list[list[str]]:
    return [gcloud_tpu(args, "delete", args.name, "--quiet")]


def cmd_ssh(args) -> list[list[str]]:
    return [gcloud_ssh(args, args.worker, args.remote_command)]


def cmd_status(args) -> list[list[str]]:
    return [gcloud_tpu(args, "describe", args.name)]


COMMANDS = {"create": cmd_create, "install": cmd_install, "run": cmd_run, "copy": cmd_copy,
            "delete": cmd_delete, "ssh": cmd_ssh, "status": cmd_status}


# ----------------------------------------------------------------------------------------------
# helpers


def gcloud_tpu(args, verb: str, *rest: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, "--zone", args.zone, "--project", args.project]


def gcloud_ssh(args, worker: str, command: str) -> list[str]:
    return gcloud_tpu(args, "ssh", args.name, f"--worker={worker}", "--command", command)


def resolve_settings(args) -> None:
    """--name/--zone/--project from the flags or their environment variables; all are required."""
    missing = []
    for key, (env, what) in SETTINGS.items():
        value = getattr(args, key) or os.environ.get(env)
        if not value:
            missing.append(f"--{key} ({what}; or env {env})")
        setattr(args, key, value)
    if missing:
        raise LaunchError("missing setting" + ("s" if len(missing) > 1 else "") + ": " + ", ".join(missing))


def runtime_for(accelerator: str) -> str:
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator)
    if not m:
        raise LaunchError(f"--accelerator-type {accelerator!r}: expected GENERATION-SIZE, e.g. v4-8, v5p-32")
    if m.group(1) not in RUNTIMES:
        raise LaunchError(f"--accelerator-type {accelerator}: no default software version for "
                          f"{m.group(1)}; pass --version (known: {', '.join(RUNTIMES)})")
    return RUNTIMES[m.group(1)]


def pinned(package: str) -> str:
    path = os.path.join(ROOT, "requirements.txt")
    for line in open(path):
        m = re.match(rf"{re.escape(package)}==(\S+)", line.strip())
        if m:
            return m.group(1)
    raise LaunchError(f"{path}: no {package}==VERSION pin; pass --jax-version")


def origin_url() -> str | None:
    try:
        out = subprocess.run(["git", "-C", ROOT, "remote", "get-url", "origin"], capture_output=True, text=True)
    except FileNotFoundError:
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def confirm_delete(args) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise LaunchError(f"refusing to delete {args.name} without confirmation: pass --yes")
    answer = input(f"Delete TPU VM {args.name} in {args.zone} ({args.project})? Type its name to confirm: ")
    if answer.strip() != args.name:
        raise LaunchError("not confirmed; nothing deleted")


def execute(commands: list[list[str]], dry_run: bool) -> int:
    if dry_run:
        for cmd in commands:
            print(shlex.join(cmd))
        return 0
    for tool in sorted({cmd[0] for cmd in commands} & {"gcloud", "gsutil"}):
        if shutil.which(tool) is None:
            raise LaunchError(f"{tool} not found on PATH: install the Google Cloud SDK "
                              "(https://cloud.google.com/sdk/docs/install) and run `gcloud auth login`, "
                              "or use --dry-run to only print the commands")
    for cmd in commands:
        print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
        rc = subprocess.run(cmd).returncode  # output streams straight through
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
