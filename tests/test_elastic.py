"""Elastic Horovod for real: horovodrun --gloo with --min-np/--max-np and the shipped discovery
script; a worker is SIGKILLed mid-training (2 -> 1 worker) and later comes back (1 -> 2)."""
import os
import re
import signal
import subprocess
import threading
import time

import pytest
from conftest import ROOT, mpi_env, run_mpi

pytestmark = pytest.mark.mpi
# two host names for this machine, so the driver can drop one host without losing the other
BOTH = "localhost slots=1\n127.0.0.1 slots=1\n"
TRAIN = ["--synthetic", "--synthetic_size", "64", "--synthetic_train", "64", "--synthetic_val", "32",
         "--batch_size", "4", "--epochs", "5", "--num_threads", "1", "--log_every", "1", "--seed", "5",
         "--export", "none"]


def worker_pid(hostname: str) -> int | None:
    """The trainer process Horovod started for ``hostname`` (its environment says so)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"train_hvd.py" not in f.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"HOROVOD_HOSTNAME={hostname}".encode() in env and b"HOROVOD_ELASTIC=1" in env:
            return int(pid)
    return None


T0 = [time.time()]
# Every wait below ends on the event it waits for, or as soon as the job has ended; this
# deadline only stops a hung job (the whole test takes about 2 minutes on a slow 2-core box).
HANG = 900


def wait_for(pred, what, proc=None, timeout=HANG):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            print(f"[{time.time() - T0[0]:6.1f} s] {what}", flush=True)
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"no {what} after {timeout} s: the job hangs")


def read(path):
    return open(path).read() if os.path.exists(path) else ""


def final_dice(out: str) -> float:
    return float(re.findall(r"exported model .*?WT=([0-9.]+)", out)[-1])


def test_elastic_run_goes_2_1_2_and_scores_like_a_fixed_run(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text(BOTH)
    T0[0] = time.time()
    logdir = tmp_path / "elastic"
    log = logdir / "training.log"
    cmd = [os.path.join(ROOT, "scripts", "launch_horovodrun.sh"), "--elastic", "--hostfile", str(hosts),
           "--np", "2", "--min-np", "1", "--max-np", "2", "--blacklist-cooldown-range", "1", "2",
           "--", *TRAIN, "--logdir", str(logdir), "--commit_every", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=mpi_env(), cwd=ROOT, start_new_session=True)
    out = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        steps = lambda: [int(s) for s in re.findall(r"^step (\d+) ", read(log), re.M)]
        wait_for(lambda: len(steps()) >= 6, "6 steps on 2 workers", proc)
        pid = worker_pid("127.0.0.1")
        assert pid, "no worker found for host 127.0.0.1"
        os.kill(pid, signal.SIGKILL)          # a worker dies mid-training ...
        hosts.write_text("localhost slots=1\n")  # ... and its host leaves the discovery list
        wait_for(lambda: "workers: 2 -> 1" in read(log), "the job to go on with 1 worker", proc)
        at_one = len(steps())
        wait_for(lambda: len(steps()) >= at_one + 4, "steps on 1 worker", proc)
        hosts.write_text(BOTH)                # the host comes back
        wait_for(lambda: "workers: 1 -> 2" in read(log), "the returning worker to be taken in", proc)
        proc.wait(timeout=HANG)
        wait_for(lambda: True, "elastic run finished")
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- log:\n{read(log)[-1500:]}\n--- output:\n{''.join(out)[-4000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=10)
    text = "".join(out)
    assert proc.returncode == 0, text[-3000:]
    assert "epoch 5/5" in text and "weights: identical on 2 ranks" in text, text[-3000:]
    # the returning worker stays: one change each way, and training went on with 2 workers
    changes = re.findall(r"^workers: (\d) -> (\d) at step (\d+)", read(log), re.M)
    assert [c[:2] for c in changes] == [("2", "1"), ("1", "2")], changes
    after = read(log).split("workers: 1 -> 2", 1)[1]
    assert len(re.findall(r"^step \d+ ", after, re.M)) >= 2, read(log)[-2000:]   # it failed at its 2nd
    elastic = final_dice(text)

    fixed = run_mpi(2, ["train_hvd.py", *TRAIN, "--logdir", str(tmp_path / "fixed")], timeout=HANG)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    normal = final_dice(fixed.stdout)
    wait_for(lambda: True, "fixed run finished")
    print(f"validation Dice WT: elastic 2->1->2 {elastic:.4f}, fixed 2 ranks {normal:.4f}")
    assert normal > 0.8, "the reference run did not learn; the comparison says nothing"
    assert abs(elastic - normal) < 0.05
