"""What a preempted host leaves behind. rundir.locked, the lock an iteration's directory is held
by: a live holder's lock is never taken, and a dead holder's is taken over with a log line,
including a holder on another host whose flock the shared file system still holds (a preempted
TPU host on NFS). SIGTERM outside training: exit 42, the lock released. (Training's SIGTERM:
tests/test_driver.py.)"""

import os
import signal
import subprocess
import sys
import time

import pytest

from spin_jax import rundir
from spin_jax.errors import RunLocked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEASE = 0.6  # seconds: heartbeats every LEASE / 8
# A holder in a process of its own. `host` stands in for the host name it records; `keep` starts a
# child that inherits the lock file, so its flock outlives the holder, as an NFS server keeps a
# dead client's lock for its lease.
HOLDER = """
import os, socket, subprocess, sys, time
host = sys.argv[2]
if host != "-":
    socket.gethostname = lambda: host
from spin_jax import rundir
with rundir.locked(sys.argv[1], "spin-jax train --iter 0"):
    if sys.argv[3] == "keep":
        d = "/proc/self/fd"
        fd = next(int(n) for n in os.listdir(d) if os.readlink(os.path.join(d, n)).endswith("/.lock"))
        subprocess.Popen(["sleep", "60"], pass_fds=[fd])
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture(autouse=True)
def short_lease(monkeypatch):
    monkeypatch.setenv("SPIN_JAX_LOCK_LEASE", str(LEASE))


def holder(directory, host="-", keep=""):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), host, keep or "-"], env=env,
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert p.stdout.readline().strip() == "held"
    return p


def stop(p):
    os.killpg(p.pid, signal.SIGKILL)  # the holder and the child keeping its flock
    p.wait()


def test_a_live_holder_keeps_its_lock_past_the_lease_on_any_host(tmp_path):
    for host in ("-", "other-host"):  # this host; another host (its flock not seen here: no flock at all)
        d = tmp_path / host
        p = holder(d, host, keep="keep" if host != "-" else "")
        try:
            time.sleep(3 * LEASE)  # heartbeats keep it fresh
            with pytest.raises(RunLocked, match=f"in use by pid {p.pid} on "):
                with rundir.locked(str(d), "spin-jax train --iter 0"):
                    pass
        finally:
            stop(p)


def test_a_killed_holder_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    p = holder(tmp_path)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    with caplog.at_level("INFO", logger="spin_jax"):
        with rundir.locked(str(tmp_path), "spin-jax train --iter 0"):
            record = open(tmp_path / ".lock").read()
            assert f'"pid": {os.getpid()}' in record
    assert f"taking over the lock of pid {p.pid}" in caplog.text and "its process is gone" in caplog.text
    assert open(tmp_path / ".lock").read() == ""  # released: no holder recorded


def test_a_dead_hosts_lock_is_taken_over_after_its_lease_and_never_before(tmp_path, caplog):
    p = holder(tmp_path, "preempted-host", keep="keep")
    try:
        os.kill(p.pid, signal.SIGKILL)  # the holder dies; its child keeps the flock, as NFS would
        p.wait()
        with pytest.raises(RunLocked, match=f"pid {p.pid} on preempted-host"):
            with rundir.locked(str(tmp_path), "x"):  # heartbeat still fresh: it may be alive
                pass
        time.sleep(LEASE * 1.5)
        with caplog.at_level("INFO", logger="spin_jax"):
            with rundir.locked(str(tmp_path), "spin-jax train --iter 0"):
                assert f"taking over the lock of pid {p.pid} on preempted-host" in caplog.text
                assert "no heartbeat for" in caplog.text
                # the new holder is live: a third process is refused however long it waits
                time.sleep(LEASE * 1.5)
                third = subprocess.run(
                    [sys.executable, "-c", "import sys; from spin_jax import rundir\n"
                     "with rundir.locked(sys.argv[1], 'y'): pass", str(tmp_path)],
                    env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=60)
                assert third.returncode != 0 and f"in use by pid {os.getpid()}" in third.stderr, third.stderr
    finally:
        os.killpg(p.pid, signal.SIGKILL)


STOPPED = """
import os, signal, sys, time
from spin_jax import cli, iterate, rundir

directory = sys.argv[1]

def generate(cfg, t, progress=True):  # sampling, stood in for: holds the lock when SIGTERM comes
    with rundir.locked(directory, "spin-jax generate --iter 0"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)

iterate.generate = generate
cli._load_config = lambda args: None
sys.argv = ["spin-jax", "generate", "--config", "configs/tiny_test.yaml", "--iter", "0"]
cli.main()
"""


def test_sigterm_outside_training_exits_42_and_releases_the_lock(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", SPIN_JAX_COMPILE_CACHE="off")
    p = subprocess.run([sys.executable, "-c", STOPPED, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 42, p.stderr
    assert "SIGTERM: stopped; finished work is kept, rerun the same command to resume" in p.stderr
    assert "Traceback" not in p.stderr and open(tmp_path / ".lock").read() == ""
