"""`launch/tpu_pod.py supervise` against a fake gcloud (tests/fake_gcloud.py) that keeps a queued
resource and its node in a JSON file and plays a scenario: capacity arriving late, preemptions, a
dropped connection, a failing run, a spent budget, and a run stopped by SIGTERM on a READY slice.
Run with -s to print each scenario's gcloud calls."""

import fcntl
import json
import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu_pod.py")
SETTINGS = ["--name", "spin-v5p", "--zone", "us-east5-a", "--project", "my-proj"]
RUN = ["--spot", "--accelerator-type", "v5p-32", "--target", "spin", "--iters", "4",
       "--config", "configs/zephyr_ultrachat_tpu.yaml", "--set", "runs_dir=/mnt/shared/runs", "--poll", "0"]
SHIM = "#!{python}\nimport runpy, sys\nsys.argv[0] = 'gcloud'\nrunpy.run_path({fake!r}, run_name='__main__')\n"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git repository to install from; supervise resolves its branch to a commit once."""
    d = tmp_path_factory.mktemp("repo")
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["init", "-q", "-b", "main"], ["commit", "-q", "--allow-empty", "-m", "first"]):
        subprocess.run(["git", "-C", str(d), *cmd], check=True, env=env)
    sha = subprocess.run(["git", "-C", str(d), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return str(d), sha


def supervise(tmp_path, repo, runs, extra=(), waits=0, qr=None, node=None, setup=True):
    """Run supervise on a scenario; (process, gcloud argv list, the attempt log's rows)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    shim = bindir / "gcloud"
    shim.write_text(SHIM.format(python=sys.executable, fake=os.path.join(ROOT, "tests", "fake_gcloud.py")))
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    state, log = tmp_path / "state.json", tmp_path / "calls.jsonl"
    state.write_text(json.dumps({"qr": qr, "node": node, "waits": waits, "runs": runs}))
    script = tmp_path / "mount_share.sh"
    script.write_text("sudo mount -t nfs 10.0.0.2:/share /mnt/shared\n")
    args = ["supervise", *SETTINGS, "--repo", repo[0], *RUN, *(["--setup", str(script)] if setup else []), *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPIN_TPU_")}
    env.update(PATH=os.pathsep.join([str(bindir), "/usr/bin", "/bin"]), FAKE_GCLOUD_STATE=str(state),
               FAKE_CLOUD_LOG=str(log), XDG_CACHE_HOME=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, SCRIPT, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    calls = [json.loads(line)[1:] for line in log.read_text().splitlines()] if log.exists() else []
    attempts = tmp_path / "launch_logs" / "spin-v5p.jsonl"
    rows = [json.loads(line) for line in attempts.read_text().splitlines()] if attempts.exists() else []
    assert "Traceback" not in p.stderr, p.stderr
    assert json.loads(state.read_text())["runs"] == [], "every scripted run was used"
    return p, calls, rows


def kind(call):
    """A short name for a gcloud call: create, delete, describe-qr, describe-node, install, setup, run, stop."""
    if call[2] == "queued-resources":
        return {"describe": "describe-qr"}.get(call[3], call[3])
    if call[3] == "describe":
        return "describe-node"
    command = call[call.index("--command") + 1]
    if "pkill" in command:
        return "stop"
    if "git checkout" in command:
        return "install"
    return "run" if "-m spin_jax " in command else "setup"


def summary(name, p, calls):
    """The scenario's exit code and its gcloud calls, consecutive describes collapsed (printed with -s)."""
    seq = []
    for c in map(kind, calls):
        if seq and seq[-1][0] == c:
            seq[-1][1] += 1
        else:
            seq.append([c, 1])
    line = " ".join(c if n == 1 else f"{c}×{n}" for c, n in seq)
    print(f"\n| {name} | {p.returncode} | {line} |")
    return [c for c, _ in seq]


def commands(calls, what):
    return [c[c.index("--command") + 1] for c in calls if kind(c) == what]


def check_common(calls, repo):
    for c in calls:
        assert c[c.index("--zone") + 1] == "us-east5-a" and c[c.index("--project") + 1] == "my-proj", c
    for c in calls:
        if kind(c) == "create":
            assert c[3:5] == ["create", "spin-v5p"] and c[c.index("--node-id") + 1] == "spin-v5p"
            assert "--spot" in c and c[c.index("--accelerator-type") + 1] == "v5p-32"
            assert c[c.index("--runtime-version") + 1] == "v2-alpha-tpuv5"
        if kind(c) == "delete":
            assert "--force" in c and "--quiet" in c
    runs = commands(calls, "run")
    assert runs and all(r == runs[0] for r in runs)  # the same command, byte for byte, on every attempt
    assert runs[0].startswith("cd spin_jax && make -s venv && SPIN_JAX_COMPILE_CACHE=/mnt/shared/runs/.xla_cache "
                              ".venv/bin/python -m spin_jax spin --config configs/zephyr_ultrachat_tpu.yaml "
                              "--iters 4 --set distributed.coordinator_address=auto --set runs_dir=/mnt/shared/runs")
    installs = commands(calls, "install")
    assert installs and all(f"git fetch -q origin {repo[1]}" in i for i in installs)  # one commit, every time
    assert all(s == "sudo mount -t nfs 10.0.0.2:/share /mnt/shared\n" for s in commands(calls, "setup"))


def test_waits_for_capacity_then_runs_to_the_end(tmp_path, repo):
    p, calls, rows = supervise(tmp_path, repo, [{"rc": 0}], waits=2, extra=["--delete-when-done"])
    seq = summary("WAITING ×2 → ACTIVE → finishes (--delete-when-done)", p, calls)
    assert p.returncode == 0, p.stderr
    check_common(calls, repo)
    assert seq == ["describe-qr", "create", "describe-qr", "describe-node", "install", "setup", "run", "delete"]
    assert [kind(c) for c in calls].count("describe-qr") == 5
    states = [line.split(": ", 1)[1] for line in p.stderr.splitlines() if "queued resource spin-v5p: " in line]
    assert states == ["none", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]  # one line per state change
    assert "the run finished (exit 0) after 0 preemption(s)" in p.stderr
    assert [(r["attempt"], r["outcome"], r["exit_code"]) for r in rows] == [(1, "finished", 0)]
    assert rows[0]["commit"] == repo[1] and rows[0]["start"] and rows[0]["end"]


def test_preempted_twice_recreates_reinstalls_and_resumes(tmp_path, repo):
    runs = [{"rc": 255, "preempt": True}, {"rc": 255, "preempt": True}, {"rc": 0}]
    p, calls, rows = supervise(tmp_path, repo, runs)
    seq = summary("preempted twice (node PREEMPTED, SUSPENDING → SUSPENDED, ssh 255) → finishes", p, calls)
    assert p.returncode == 0, p.stderr
    check_common(calls, repo)
    cycle = ["describe-qr", "describe-node", "describe-qr", "delete", "describe-qr", "create", "describe-qr",
             "describe-node", "install", "setup", "run"]  # the run's end; SUSPENDED: delete, gone, create, ACTIVE
    assert seq == ["describe-qr", "create", "describe-qr", "describe-node", "install", "setup", "run", *cycle, *cycle]
    assert [(r["outcome"], r["queued_resource"], r["node"], r["preemptions"]) for r in rows] == [
        ("preempted", "SUSPENDING", "PREEMPTED", 1), ("preempted", "SUSPENDING", "PREEMPTED", 2),
        ("finished", None, None, 2)]
    assert "preempted (exit 255; queued resource SUSPENDING, node PREEMPTED); 2 of 10" in p.stderr


def test_a_dropped_connection_on_a_ready_slice_reruns_without_recreating(tmp_path, repo):
    p, calls, rows = supervise(tmp_path, repo, [{"rc": 255}, {"rc": 0}], qr="ACTIVE", node="READY")
    seq = summary("ssh 255 with the node READY → stop leftovers, rerun → finishes", p, calls)
    assert p.returncode == 0, p.stderr
    check_common(calls, repo)
    # the slice existed and was READY: set up once, never deleted or created
    assert seq == ["describe-qr", "describe-node", "install", "setup", "run", "describe-qr", "describe-node",
                   "stop", "describe-qr", "describe-node", "run"]
    assert [r["outcome"] for r in rows] == ["connection", "finished"]


def test_a_failing_run_is_never_retried(tmp_path, repo):
    p, calls, rows = supervise(tmp_path, repo, [{"rc": 1}], qr="ACTIVE", node="READY")
    seq = summary("the run exits 1 → stop", p, calls)
    assert p.returncode == 1
    assert seq == ["describe-qr", "describe-node", "install", "setup", "run", "describe-qr", "describe-node"]
    assert "the run failed (exit 1 on a READY slice); not retried" in p.stderr
    assert "spin-jax train: error: data.name: no such dataset" in p.stderr  # its last lines
    assert [r["outcome"] for r in rows] == ["failed"]


def test_preemptions_past_the_retries_give_up(tmp_path, repo):
    runs = [{"rc": 255, "preempt": True}] * 3
    p, calls, rows = supervise(tmp_path, repo, runs, extra=["--retries", "2"])
    seq = summary("preempted 3 times with --retries 2 → give up", p, calls)
    assert p.returncode == 3
    assert seq.count("run") == 3 and seq.count("create") == 3 and seq[-1] == "describe-node"
    assert "gave up: preempted 3 times, more than --retries 2" in p.stderr
    assert [r["outcome"] for r in rows] == ["preempted"] * 3


def test_exit_42_on_a_ready_slice_counts_a_preemption_and_reruns_in_place(tmp_path, repo):
    p, calls, rows = supervise(tmp_path, repo, [{"rc": 42}, {"rc": 0}], setup=False)
    seq = summary("the run exits 42 (SIGTERM) with the node READY → rerun in place → finishes", p, calls)
    assert p.returncode == 0, p.stderr
    check_common(calls, repo)
    assert seq == ["describe-qr", "create", "describe-qr", "describe-node", "install", "run", "describe-qr",
                   "describe-node", "describe-qr", "describe-node", "run"]  # no delete, create or second install
    assert [(r["outcome"], r["exit_code"], r["preemptions"]) for r in rows] == [("preempted", 42, 1),
                                                                                ("finished", 0, 1)]


def test_one_supervisor_per_slice_and_a_dry_run(tmp_path, repo):
    lock_dir = tmp_path / "cache" / "spin_jax" / "supervise"
    lock_dir.mkdir(parents=True)
    with open(lock_dir / "my-proj_us-east5-a_spin-v5p.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 1 since then")
        held.flush()
        env = dict(os.environ, PATH="/usr/bin:/bin", XDG_CACHE_HOME=str(tmp_path / "cache"))
        os.makedirs(tmp_path / "bin", exist_ok=True)
        shim = tmp_path / "bin" / "gcloud"
        shim.write_text("#!/bin/sh\nexit 9\n")
        shim.chmod(0o755)
        env["PATH"] = f"{tmp_path / 'bin'}:/usr/bin:/bin"
        p = subprocess.run([sys.executable, SCRIPT, "supervise", *SETTINGS, "--repo", repo[0], *RUN], env=env,
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 2 and "already supervised by pid 1" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, SCRIPT, "supervise", *SETTINGS, "--repo", repo[0], *RUN, "--dry-run"],
                       env=dict(os.environ, PATH="/usr/bin:/bin"), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "queued-resources create spin-v5p --node-id spin-v5p --accelerator-type v5p-32" in p.stdout
    assert "queued-resources delete spin-v5p --force --quiet" in p.stdout and "--spot" in p.stdout
    assert "SPIN_JAX_COMPILE_CACHE=/mnt/shared/runs/.xla_cache" in p.stdout
