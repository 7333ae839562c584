#!/usr/bin/env python3
"""Run spin_jax on a Cloud TPU VM or pod slice with gcloud: create, install, run, copy, delete.

    S="--name spin --zone us-central2-b --project my-proj"
    python launch/tpu_pod.py create  $S [--accelerator-type v4-8] [--spot]
    python launch/tpu_pod.py install $S --repo https://github.com/ORG/spin_jax.git
    python launch/tpu_pod.py run     $S --iter 0 [--config C] [--set k=v ...]
    python launch/tpu_pod.py run     $S --target spin --iters 3
    python launch/tpu_pod.py copy    $S [--run RUN] [--runs-dir gs://bucket/runs] [--dest DIR]
    python launch/tpu_pod.py delete  $S --yes
    python launch/tpu_pod.py supervise $S --spot --accelerator-type v5p-32 --repo URL --target spin --iters 4 \
        --set runs_dir=/mnt/shared/runs --setup mount_share.sh [--retries 10] [--delete-when-done]

`supervise` keeps a Spot slice alive through a queued resource and the run going until it
finishes: it recreates a preempted slice, sets it up at the same commit and reruns the same
command, which resumes from the run's checkpoints (docs/tpu.md, "Spot TPUs").

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
import collections
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

DEFAULT_ACCELERATOR = "v4-8"  # one host, 4 chips (8 TensorCores, 32 GiB HBM each chip)
# TPU VM software versions per generation (cloud.google.com/tpu/docs/runtimes)
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
            "v6e": "v2-alpha-tpuv6e"}
LIBTPU_RELEASES = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
DEFAULT_CONFIG = "configs/cpu_default.yaml"  # the Makefile's
# `run --target T`: the venv target of the Makefile it needs, and the spin-jax command. The run calls
# spin-jax itself (not `make T`): make turns every failure into its own exit 2, and the supervisor
# tells a preemption (spin-jax's exit 42) from a bug (1, 2) by the code.
TARGETS = {"train": ("venv", "train"), "generate": ("venv", "generate"), "spin": ("venv", "spin"),
           "evaluate": ("venv", "evaluate"), "benchmark": ("venv-eval", "benchmark")}
EXIT_PREEMPTED = 42  # spin-jax: stopped by SIGTERM with its work saved; the same command resumes
EXIT_GAVE_UP = 3  # supervise: preempted (or disconnected) more often than its budget allows
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
        if args.command == "supervise":
            return supervise(args)
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
    add_create_flags(s)
    s = add("install", "clone the repo and build its venv on every worker")
    add_install_flags(s)
    s = add("run", "run spin-jax train|generate|spin|evaluate|benchmark on every worker")
    add_run_flags(s)
    s.add_argument("--worker", default="all", help="which workers (default all)")

    s = add("supervise", "keep a Spot slice and the run going until the run finishes (queued resources)")
    add_create_flags(s)
    add_install_flags(s)
    add_run_flags(s)
    s.add_argument("--retries", type=int, default=10,
                   help="preemptions (and recreations of a FAILED slice) to recover from before giving up (default 10)")
    s.add_argument("--connection-retries", type=int, default=3,
                   help="reruns after ssh drops (exit 255) while the slice stays READY (default 3)")
    s.add_argument("--poll", type=float, default=30.0, help="seconds between state checks (default 30)")
    s.add_argument("--setup", metavar="SCRIPT",
                   help="a local shell script to run on every worker of every (re)created slice after install, "
                        "e.g. mounting the shared runs directory")
    s.add_argument("--delete-when-done", action="store_true",
                   help="delete the queued resource (and its slice) once the run finished")
    s.add_argument("--queued-resource", help="the queued resource's id (default: --name)")
    s.add_argument("--valid-until-duration", metavar="D",
                   help="give up waiting for capacity after D (gcloud's format, e.g. 6h); the resource then FAILs")
    s.add_argument("--log-dir", default="launch_logs",
                   help="where <name>.jsonl gets one JSON line per attempt (default launch_logs)")

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


def add_create_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--accelerator-type", default=DEFAULT_ACCELERATOR,
                   help=f"e.g. v4-8, v4-64, v5litepod-8, v5p-32 (default {DEFAULT_ACCELERATOR})")
    s.add_argument("--version", help="TPU software version (default: the generation's base image, "
                   + ", ".join(f"{k}: {v}" for k, v in RUNTIMES.items()) + ")")
    s.add_argument("--spot", action="store_true", help="a Spot VM: cheaper, may be preempted (default off)")


def add_install_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--repo", default=os.environ.get("SPIN_TPU_REPO"),
                   help="git URL to clone (or env SPIN_TPU_REPO; default: this checkout's origin)")
    s.add_argument("--ref", default="main", help="branch, tag or commit to check out (default main)")
    s.add_argument("--python", default="python3.11", help="interpreter for the venv; installed from "
                   "the deadsnakes PPA if missing (default python3.11)")
    s.add_argument("--jax-version", default=None,
                   help="jax[tpu] version (default: the jax pin of requirements.txt)")


def add_run_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--target", choices=tuple(TARGETS), default="train")
    s.add_argument("--iter", type=int, default=0, help="iteration for train/generate/evaluate/benchmark (default 0)")
    s.add_argument("--tasks", default=None, help="for benchmark: lm-eval tasks or a preset, e.g. open_llm")
    s.add_argument("--iters", type=int, default=2, help="iterations for spin (default 2)")
    s.add_argument("--config", help=f"config file in the repo (default {DEFAULT_CONFIG})")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override passed on to spin-jax (repeatable); distributed.coordinator_address "
                        "is set to auto (JAX finds the slice's workers) unless overridden here")
    s.add_argument("--compile-cache", metavar="DIR",
                   help="SPIN_JAX_COMPILE_CACHE on the workers (default <runs_dir>/.xla_cache, runs_dir from "
                        "--set runs_dir=... or the config; 'off': none). On the shared runs directory every host "
                        "and every recreated slice loads the compiled programs")


# ----------------------------------------------------------------------------------------------
# the gcloud commands of each subcommand


def cmd_create(args) -> list[list[str]]:
    accel = args.accelerator_type
    version = args.version or runtime_for(accel)
    cmd = gcloud_tpu(args, "create", args.name, "--accelerator-type", accel, "--version", version)
    return [cmd + (["--spot"] if args.spot else [])]


def cmd_install(args) -> list[list[str]]:
    return [gcloud_ssh(args, "all", install_script(args))]


def install_script(args) -> str:
    """Idempotent set-up of a worker: the checkout at --ref, its venv, and jax[tpu]."""
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
    return script


def cmd_run(args) -> list[list[str]]:
    return [gcloud_ssh(args, getattr(args, "worker", "all"), run_script(args))]


def run_script(args) -> str:
    """The shell command `run` (and every attempt of `supervise`) runs on each worker: the venv
    its target needs, then spin-jax itself, so its exit code (0 done, 42 stopped by SIGTERM,
    1 failed, 2 usage) reaches gcloud's."""
    venv, command = TARGETS[args.target]
    config = args.config or DEFAULT_CONFIG
    argv = [".venv/bin/python", "-m", "spin_jax", command, "--config", config]
    argv += ["--iters", str(args.iters)] if args.target == "spin" else ["--iter", str(args.iter)]
    if args.tasks:
        if args.target != "benchmark" or not re.fullmatch(r"[\w,.-]+", args.tasks):
            raise LaunchError(f"--tasks {args.tasks!r}: goes with --target benchmark, as comma-separated task names")
    if args.target == "benchmark":
        argv += ["--tasks", args.tasks or "spin_local"]
    # every worker joins one JAX process group; JAX finds the workers itself on a TPU VM slice
    overrides = ["distributed.coordinator_address=auto", *args.set]
    for o in overrides:
        if "=" not in o or re.search(r"[\s\"'`$\\]", o):
            raise LaunchError(f"--set {o!r}: expected KEY=VALUE without spaces, quotes, $ or backslashes")
        argv += ["--set", o]
    cache = compile_cache_dir(args)
    env = f"SPIN_JAX_COMPILE_CACHE={shlex.quote(cache)} " if cache else ""
    return f"cd {shlex.quote(args.repo_dir)} && make -s {venv} && {env}{shlex.join(argv)}"


def compile_cache_dir(args) -> str | None:
    """--compile-cache, else <runs_dir>/.xla_cache with runs_dir from --set runs_dir=... or the
    config file's top-level runs_dir (relative paths are the checkout's on the worker)."""
    if args.compile_cache:
        return None if args.compile_cache.lower() == "off" else args.compile_cache
    return runs_dir_of(args).rstrip("/") + "/.xla_cache"


def runs_dir_of(args) -> str:
    for o in reversed(args.set):
        if o.startswith("runs_dir="):
            return o.split("=", 1)[1]
    path = os.path.join(ROOT, args.config or DEFAULT_CONFIG)
    if os.path.exists(path):
        m = re.search(r"^runs_dir:\s*[\"']?([^\s\"'#]+)", open(path).read(), re.M)
        if m:
            return m.group(1)
    return "runs"


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


def require(tool: str) -> None:
    if shutil.which(tool) is None:
        raise LaunchError(f"{tool} not found on PATH: install the Google Cloud SDK "
                          "(https://cloud.google.com/sdk/docs/install) and run `gcloud auth login`, "
                          "or use --dry-run to only print the commands")


def execute(commands: list[list[str]], dry_run: bool) -> int:
    if dry_run:
        for cmd in commands:
            print(shlex.join(cmd))
        return 0
    for tool in sorted({cmd[0] for cmd in commands} & {"gcloud", "gsutil"}):
        require(tool)
    for cmd in commands:
        print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
        rc = subprocess.run(cmd).returncode  # output streams straight through
        if rc:
            return rc
    return 0


# ----------------------------------------------------------------------------------------------
# supervise: a Spot slice through a queued resource, recreated after preemption, and the run resumed

# A queued resource goes ACCEPTED / WAITING_FOR_RESOURCES / PROVISIONING -> ACTIVE, and after a
# preemption SUSPENDING -> SUSPENDED; supervise waits through the rest and recreates these:
QR_ENDED = ("FAILED", "SUSPENDED")
# Before a rerun on a slice that stayed READY: stop what is left of the run the lost connection
# was attached to (SIGTERM saves a checkpoint), so that it does not hold the iteration's lock.
STOP_LEFTOVERS = ("pkill -TERM -f '[.]venv/bin/python -m spin_jax '; for i in $(seq 90); do "
                  "pgrep -f '[.]venv/bin/python -m spin_jax ' >/dev/null || exit 0; sleep 1; done; "
                  "pkill -KILL -f '[.]venv/bin/python -m spin_jax '; true")


class GaveUp(Exception):
    """supervise spent a budget (preemptions or broken connections); exit EXIT_GAVE_UP."""


class Failed(Exception):
    """The run failed on a READY slice, or gcloud refused a request: never retried; exit 1."""


def supervise(args) -> int:
    if args.retries < 0 or args.connection_retries < 0 or args.poll < 0:
        raise LaunchError("--retries, --connection-retries and --poll must be >= 0")
    if args.setup and not os.path.isfile(args.setup):
        raise LaunchError(f"--setup {args.setup}: no such file")
    args.qr = args.queued_resource or args.name
    args.version = args.version or runtime_for(args.accelerator_type)
    args.repo = args.repo or origin_url()
    if not args.repo:
        raise LaunchError("no repository to clone: pass --repo URL (or set SPIN_TPU_REPO)")
    run = run_script(args)  # checks --set and --tasks before anything runs
    if args.dry_run:
        return supervise_dry_run(args, run)
    require("gcloud")
    args.ref = resolve_commit(args.repo, args.ref)
    with supervisor_lock(args):
        sup = Supervisor(args, run)
        try:
            return sup.loop()
        except GaveUp as e:
            sup.say(f"gave up: {e}")
            return EXIT_GAVE_UP
        except Failed as e:
            sup.say(f"stopped: {e}")
            return 1
        except KeyboardInterrupt:
            sup.say("interrupted; the slice is left as it is (rerun the same command to go on)")
            return 130


class Supervisor:
    def __init__(self, args, run: str):
        self.args, self.run = args, run
        self.preemptions = self.disconnects = 0
        self.attempt = 0
        self.shown: dict[str, str | None] = {}
        os.makedirs(args.log_dir, exist_ok=True)
        self.log_path = os.path.join(args.log_dir, f"{args.name}.jsonl")
        runs = runs_dir_of(args)
        if not runs.startswith(("/", "gs://")):
            self.say(f"warning: runs_dir {runs} is on each worker's boot disk, which a recreated slice "
                     "does not have: its checkpoints and compile cache are lost with it. Mount a share in --setup "
                     "and pass --set runs_dir=/mnt/shared/runs")

    # -- the loop
    def loop(self) -> int:
        a = self.args
        self.say(f"supervising {a.name} ({a.accelerator_type}{', spot' if a.spot else ''}) in {a.zone} ({a.project}) "
                 f"at commit {a.ref}; log: {self.log_path}")
        fresh = True  # set up the slice on the first attempt and after every recreation
        while True:
            fresh = self.ensure_slice() or fresh
            if fresh:
                self.set_up()
                fresh = False
            self.attempt += 1
            start = now()
            self.say(f"attempt {self.attempt}: running on all workers")
            rc, tail = self.run_on_slice()
            qr, node = (None, None) if rc == 0 else (self.qr_state(), self.node_state())
            outcome, why = classify(rc, qr, node)
            self.preemptions += outcome == "preempted"
            self.disconnects += outcome == "connection"
            self.record(start=start, end=now(), exit_code=rc, queued_resource=qr, node=node, outcome=outcome)
            if outcome == "finished":
                self.say(f"attempt {self.attempt}: the run finished (exit 0) after {self.preemptions} preemption(s)")
                if a.delete_when_done:
                    self.gcloud(*self.qr_cmd("delete", "--force", "--quiet"))
                    self.say(f"deleted queued resource {a.qr} (--delete-when-done)")
                return 0
            if outcome == "failed":
                raise Failed(f"the run failed ({why}); not retried. Its last lines:\n" + "\n".join(tail))
            if outcome == "connection":
                if self.disconnects > a.connection_retries:
                    raise GaveUp(f"ssh lost the connection {self.disconnects} times (--connection-retries "
                                 f"{a.connection_retries}); the slice is READY: rerun the same command to go on")
                self.say(f"attempt {self.attempt}: {why}; stopping leftovers, then the same run again "
                         f"({self.disconnects} of {a.connection_retries})")
                self.ssh(STOP_LEFTOVERS)
                continue
            if self.preemptions > a.retries:
                raise GaveUp(f"preempted {self.preemptions} times, more than --retries {a.retries}; the run resumes "
                             "from its last checkpoint: rerun the same command (or raise --retries)")
            self.say(f"attempt {self.attempt}: preempted ({why}); {self.preemptions} of {a.retries}")

    def ensure_slice(self) -> bool:
        """Wait until the queued resource is ACTIVE and its node READY, creating it (again) when it
        is missing, FAILED or SUSPENDED. True when it was (re)created."""
        created = False
        while True:
            qr = self.qr_state()
            if qr is None:
                self.create()
                created = True
            elif qr in QR_ENDED:
                if qr == "FAILED" and created:  # this supervisor's own request failed: counts as a preemption
                    self.preemptions += 1
                    if self.preemptions > self.args.retries:
                        raise GaveUp(f"queued resource {self.args.qr} FAILED; --retries {self.args.retries} spent")
                self.say(f"queued resource {self.args.qr} is {qr}: deleting it to create it again")
                self.gcloud(*self.qr_cmd("delete", "--force", "--quiet"))
                self.wait_gone()
            elif qr == "ACTIVE":
                node = self.node_state()
                if node == "READY":
                    return created
                self.pause()
            else:  # waiting for capacity, provisioning, or on its way to SUSPENDED
                self.pause()

    def create(self) -> None:
        a = self.args
        cmd = self.qr_cmd("create", "--node-id", a.name, "--accelerator-type", a.accelerator_type,
                          "--runtime-version", a.version)
        if a.spot:
            cmd.append("--spot")
        if a.valid_until_duration:
            cmd += ["--valid-until-duration", a.valid_until_duration]
        self.gcloud(*cmd)
        self.say(f"queued resource {a.qr} requested")

    def wait_gone(self) -> None:
        while self.qr_state() is not None:
            self.pause()

    def set_up(self) -> None:
        a = self.args
        self.say(f"installing commit {a.ref} on every worker")
        if self.ssh(install_script(a)) != 0:
            raise Failed("install failed on the slice (its output is above)")
        if a.setup:
            self.say(f"running {a.setup} on every worker")
            if self.ssh(open(a.setup).read()) != 0:
                raise Failed(f"--setup {a.setup} failed on the slice (its output is above)")

    # -- gcloud
    def qr_cmd(self, verb: str, *rest: str) -> list[str]:
        return ["compute", "tpus", "queued-resources", verb, self.args.qr, *rest,
                "--zone", self.args.zone, "--project", self.args.project]

    def qr_state(self) -> str | None:
        return self.describe("queued resource", self.qr_cmd("describe", "--format=value(state.state)"))

    def node_state(self) -> str | None:
        a = self.args
        return self.describe("node", ["compute", "tpus", "tpu-vm", "describe", a.name, "--zone", a.zone,
                                      "--project", a.project, "--format=value(state)"])

    def describe(self, what: str, cmd: list[str]) -> str | None:
        """The state gcloud reports, or None when the resource does not exist; a state change is
        printed once."""
        for tries in range(1, 4):
            p = subprocess.run(["gcloud", *cmd], capture_output=True, text=True)
            if p.returncode == 0:
                state = p.stdout.strip() or "UNKNOWN"
                break
            if re.search(r"NOT_FOUND|not found", p.stderr):
                state = None
                break
            if tries == 3:
                raise Failed(f"gcloud {' '.join(cmd[:4])} failed 3 times: {p.stderr.strip()[-500:]}")
            self.pause()
        if self.shown.get(what, "") != state:
            self.shown[what] = state
            self.say(f"{what} {self.args.qr if what.startswith('queued') else self.args.name}: {state or 'none'}")
        return state

    def gcloud(self, *cmd: str) -> None:
        p = subprocess.run(["gcloud", *cmd], capture_output=True, text=True)
        if p.returncode != 0:
            raise Failed(f"gcloud {' '.join(cmd[:4])} failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")

    def ssh(self, command: str) -> int:
        return subprocess.run(gcloud_ssh(self.args, "all", command)).returncode

    def run_on_slice(self) -> tuple[int, list[str]]:
        """The run on every worker, its output streamed through; (exit code, its last 20 lines)."""
        tail: collections.deque = collections.deque(maxlen=20)
        p = subprocess.Popen(gcloud_ssh(self.args, "all", self.run), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, errors="replace")
        try:
            for line in p.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                tail.append(line.rstrip("\n"))
            return p.wait(), list(tail)
        except BaseException:
            p.terminate()
            p.wait()
            raise

    # -- output
    def pause(self) -> None:
        time.sleep(self.args.poll)

    def say(self, message: str) -> None:
        print(f"[supervise {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def record(self, **fields) -> None:
        row = dict(attempt=self.attempt, **fields, preemptions=self.preemptions, disconnects=self.disconnects,
                   commit=self.args.ref, command=self.run)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")


def classify(rc: int, qr: str | None, node: str | None) -> tuple[str, str]:
    """How a run ended: finished, preempted (recreate if needed, rerun), connection (rerun),
    failed (stop); with the reason."""
    if rc == 0:
        return "finished", "exit 0"
    if qr != "ACTIVE" or node != "READY":
        return "preempted", f"exit {rc}; queued resource {qr or 'gone'}, node {node or 'gone'}"
    if rc == EXIT_PREEMPTED:
        return "preempted", f"the run stopped on SIGTERM (exit {rc}) on a READY slice"
    if rc == 255:
        return "connection", "ssh lost the connection (exit 255) while the slice stayed READY"
    return "failed", f"exit {rc} on a READY slice"


def resolve_commit(repo: str, ref: str) -> str:
    """The commit `ref` names in `repo`, resolved once so that every attempt installs the same code."""
    if re.fullmatch(r"[0-9a-f]{40}", ref):
        return ref
    try:
        p = subprocess.run(["git", "ls-remote", repo, ref, f"{ref}^{{}}"], capture_output=True, text=True, timeout=120)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"cannot resolve --ref {ref} in {repo} ({e}); pass --ref with a full commit id") from None
    if p.returncode != 0:
        raise LaunchError(f"git ls-remote {repo}: {p.stderr.strip() or 'failed'}; check --repo, or pass --ref COMMIT")
    refs = dict(reversed(line.split("\t")) for line in p.stdout.splitlines() if "\t" in line)
    for name in (f"refs/tags/{ref}^{{}}", f"refs/heads/{ref}", f"refs/tags/{ref}", ref):
        if name in refs:
            return refs[name]
    raise LaunchError(f"--ref {ref}: no such branch or tag in {repo}; pass a branch, a tag or a full commit id")


class supervisor_lock:
    """One supervisor per slice on this machine: an exclusive lock on a file named after the
    project, zone and name, held while supervise runs."""

    def __init__(self, args):
        home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(home, "spin_jax", "supervise")
        os.makedirs(d, exist_ok=True)
        self.path = os.path.join(d, f"{args.project}_{args.zone}_{args.name}.lock")
        self.args = args

    def __enter__(self):
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.seek(0)
            holder = self.f.read().strip() or "another process"
            self.f.close()
            raise LaunchError(f"{self.args.name} in {self.args.zone} ({self.args.project}) is already supervised "
                              f"by {holder} ({self.path}); stop that one first") from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.f.flush()
        return self

    def __exit__(self, *exc):
        self.f.close()


def supervise_dry_run(args, run: str) -> int:
    """The commands supervise would run, in order, with when each runs; nothing is called."""
    def show(cmd):
        print(shlex.join(cmd))

    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    where = ["--zone", args.zone, "--project", args.project]
    ref = args.ref if re.fullmatch(r"[0-9a-f]{40}", args.ref) else f"<commit of {args.ref}>"
    print(f"# the commit every attempt installs, resolved once at start: git ls-remote {args.repo} {args.ref}")
    print("# 1. the slice: created when missing (or FAILED / SUSPENDED, after a forced delete), polled "
          f"every {args.poll:g} s until ACTIVE and READY")
    create = [*qr, "create", args.qr, "--node-id", args.name, "--accelerator-type", args.accelerator_type,
              "--runtime-version", args.version, *where] + (["--spot"] if args.spot else [])
    if args.valid_until_duration:
        create += ["--valid-until-duration", args.valid_until_duration]
    show([*qr, "describe", args.qr, *where, "--format=value(state.state)"])
    show(create)
    show(["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name, *where, "--format=value(state)"])
    print(f"# 2. set-up on every worker of a new slice: install at {ref}"
          + (f", then {args.setup}" if args.setup else ""))
    args.ref = ref
    show(cmd_install(args)[0])
    if args.setup:
        show(gcloud_ssh(args, "all", f"<the contents of {args.setup}>"))
    print("# 3. the run, byte for byte the same on every attempt")
    show(gcloud_ssh(args, "all", run))
    print(f"# 4. exit 0: done{'; then the queued resource is deleted' if args.delete_when_done else ''}. "
          f"Preempted (the node not READY, the queued resource SUSPENDING/SUSPENDED/gone, or exit "
          f"{EXIT_PREEMPTED}): back to 1, at most {args.retries} times; a forced delete first when needed:")
    show([*qr, "delete", args.qr, "--force", "--quiet", *where])
    print(f"#    ssh exit 255 on a READY slice: stop leftovers, then 3. again, at most {args.connection_retries} "
          "times:")
    show(gcloud_ssh(args, "all", STOP_LEFTOVERS))
    print("#    any other exit on a READY slice: stop with the run's last lines (exit 1)")
    return 0


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


if __name__ == "__main__":
    sys.exit(main())
