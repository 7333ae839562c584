"""`make test` timed as a new user and a developer meet it: a fresh clone with an empty compilation
cache (cold: its venv built, every program compiled), then the same clone again (warm: programs
loaded from the cache). For each: wall time, peak RSS of the whole process tree (pytest, its
workers and every CLI run they start, summed), the test count, and pytest's slowest tests.

    make bench-tests                               # HEAD, cold then warm
    python bench/bench_tests.py --ref c1e203d      # another commit, in the same way
    python bench/bench_tests.py --runs warm        # only the warm run (after a cold one in --work)

The run's caches live in --work (SPIN_JAX_COMPILE_CACHE, SPIN_JAX_PLAN_CACHE, SPIN_JAX_TOKENIZER_CACHE
and the tests' transformers references, SPIN_JAX_REFERENCE_CACHE), so ~/.cache is neither read nor
changed; the pip cache is (the venv installs from it).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default="HEAD", help="the commit to clone and test")
    ap.add_argument("--runs", default="cold,warm", help="cold, warm or both (in that order)")
    ap.add_argument("--work", default=None, help="folder for the clone and its cache (default: a new temp folder)")
    ap.add_argument("--args", default="", help="extra pytest arguments (make test ARGS=...)")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="bench_tests.")
    clone, cache = os.path.join(work, "clone"), os.path.join(work, "xla")
    ref = subprocess.run(["git", "rev-parse", "--short", args.ref], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    if not os.path.isdir(clone):
        subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
        subprocess.run(["git", "checkout", "-q", ref], cwd=clone, check=True)
    env = dict(os.environ, SPIN_JAX_COMPILE_CACHE=cache, SPIN_JAX_PLAN_CACHE=os.path.join(work, "plan"),
               SPIN_JAX_REFERENCE_CACHE=os.path.join(work, "reference"),
               SPIN_JAX_TOKENIZER_CACHE=os.path.join(work, "tokenizers"))
    print(f"# make test at {ref}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"clone and cache in {work}", flush=True)
    failed = []
    for run in args.runs.split(","):
        log_path = os.path.join(work, f"{run}.log")
        rc, wall, peak, out = timed(["make", "test", f"ARGS={args.args}"], clone, env, log_path)
        summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed)", line)]
        print(f"{run}: {wall:.0f} s ({wall / 60:.1f} min), peak RSS {peak / 2**30:.1f} GiB, "
              f"{summary[-1].strip('= ') if summary else 'no pytest summary'}"
              + (f"; make test FAILED (exit {rc}), its output: {log_path}" if rc else ""), flush=True)
        slow = out.split("slowest", 1)[1].splitlines()[1:16] if "slowest" in out else []
        for line in slow:
            print(f"    {line}")
        if rc:
            failed.append(run)
    if failed:
        sys.exit(f"make test failed in the {' and '.join(failed)} run(s): the times above include the failures")


def timed(cmd, cwd, env, log_path):
    """Exit code, wall seconds, peak summed RSS in bytes of the process tree, and the output of `cmd`."""
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak = [0]
        done = threading.Event()
        watcher = threading.Thread(target=_watch, args=(p.pid, peak, done), daemon=True)
        watcher.start()
        p.wait()
        wall = time.perf_counter() - t0
        done.set()
        watcher.join()
    with open(log_path) as f:
        out = f.read()
    return p.returncode, wall, peak[0], out


def _watch(root: int, peak: list, done: threading.Event) -> None:
    """Twice a second: the summed resident memory of `root` and all its descendants."""
    while not done.is_set():
        peak[0] = max(peak[0], sum(_rss(pid) for pid in _tree(root)))
        done.wait(0.5)


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


if __name__ == "__main__":
    main()
