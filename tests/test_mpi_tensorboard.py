"""Rank 0 alone logs: a real TensorBoard server reads the tags; rank 1 writes nothing."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from conftest import HANG, ROOT, mpi_env
from h5fixture import write_h5

from unet.training.schedule import learning_rate

pytestmark = pytest.mark.mpi


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url):
    with urllib.request.urlopen(url, timeout=60) as r:   # a busy server answers late, not never
        return json.loads(r.read())


def test_rank0_tensorboard_scalars_images_histograms_and_nothing_from_rank1(tmp_path):
    data = write_h5(str(tmp_path / "data.h5"))
    wd0, wd1 = tmp_path / "rank0", tmp_path / "rank1"
    wd0.mkdir(); wd1.mkdir()
    train = [sys.executable, os.path.join(ROOT, "train_hvd.py"), "--data", data, "--logdir", "logs",
             "--batch_size", "4", "--epochs", "2", "--log_every", "1", "--image_every", "2", "--export", "none"]
    # MPMD launch: same program, each rank in its own working directory, so a
    # relative --logdir shows exactly what each rank wrote.
    cmd = ["mpirun", "--oversubscribe", "-np", "1", "-wdir", str(wd0), *train, ":",
           "-np", "1", "-wdir", str(wd1), *train]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG, env=mpi_env())
    assert p.returncode == 0, p.stderr[-3000:]
    assert "input 32x32x2 (FLAIR,T1ce) regions WT,TC,ET" in p.stdout   # shape from the file's metadata
    assert "global_batch=8 steps/epoch=3" in p.stdout
    assert not (wd1 / "logs").exists(), list(wd1.rglob("*"))
    logs = wd0 / "logs"
    assert (logs / "model.keras").is_file() and (logs / "model.json").is_file()
    assert len(list((logs / "checkpoints").glob("ckpt-*.npz"))) == 2
    assert (logs / "checkpoints" / "best.npz").is_file()
    exported = json.loads((logs / "model.json").read_text())["exported"]
    assert exported in ("best validation epoch 1 of 2", "best validation epoch 2 of 2")
    assert f"exporting the {exported[:21]}" in p.stdout
    lines = (logs / "training.log").read_text().splitlines()
    steps = [l.split() for l in lines if l.startswith("step ")]
    assert len(steps) == 6 and "dice_ET" in steps[0]
    # step N epoch E loss L dice_WT a dice_TC b dice_ET c lr R img/s X
    assert all(f[0::2][:8] == ["step", "epoch", "loss", "dice_WT", "dice_TC", "dice_ET", "lr", "img/s"]
               and float(f[15]) > 0 for f in steps)
    # the rate the trainer used is the schedule's: 2 workers, linear scaling, 1 warmup epoch = 3 steps
    want = [learning_rate(s, base_lr=0.0005, num_workers=2, scaling="linear", warmup_steps=3,
                          decay_steps=150, lr_fraction=0.25) for s in range(6)]
    assert [float(f[13]) for f in steps] == pytest.approx(want, rel=1e-5)
    assert not any("epoch 1/2" in l for l in p.stderr.splitlines())   # no progress bar: not a terminal

    port = free_port()
    tb = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "tensorboard"),
                           "--logdir", str(logs), "--host", "127.0.0.1", "--port", str(port),
                           "--reload_interval", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, scalars = time.time() + HANG, {}      # TensorBoard starts and loads the logs
        while time.time() < deadline and tb.poll() is None:
            try:
                scalars = get_json(f"{base}/data/plugin/scalars/tags")
                if "validation" in scalars and "train" in scalars:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert "train" in scalars and "validation" in scalars, f"TensorBoard exited ({tb.poll()}) or shows {scalars}"
        assert {"loss", "learning_rate", "img_per_sec", "dice_WT", "dice_TC", "dice_ET"} <= set(scalars["train"])
        assert {"loss", "dice_WT", "dice_TC", "dice_ET"} <= set(scalars["validation"])
        loss = get_json(f"{base}/data/plugin/scalars/scalars?run=train&tag=loss")
        assert [pt[1] for pt in loss] == [0, 1, 2, 3, 4, 5]       # one point per step
        lr = get_json(f"{base}/data/plugin/scalars/scalars?run=train&tag=learning_rate")
        assert [pt[2] for pt in lr] == pytest.approx(want, rel=1e-6)
        images = get_json(f"{base}/data/plugin/images/tags")
        assert {"input", "ground_truth", "prediction"} <= set(images["train"])
        hist = get_json(f"{base}/data/plugin/histograms/tags")
        kernel = next(t for t in hist["train"] if "conv1a" in t and "kernel" in t)
        epochs = get_json(f"{base}/data/plugin/histograms/histograms?run=train&tag={kernel}")
        # every weight of conv1a (3x3, 2 channels in, 32 out) counted once per epoch, buckets in order
        assert [e[1] for e in epochs] == [3, 6]                  # the step at each epoch's end
        for _, _, buckets in epochs:
            assert sum(b[2] for b in buckets) == 3 * 3 * 2 * 32
            assert all(b[0] < b[1] for b in buckets) and all(a[1] == b[0] for a, b in zip(buckets, buckets[1:]))
    finally:
        tb.terminate()
        tb.wait(timeout=30)


def test_progress_bar_on_rank0_when_a_terminal(tmp_path):
    """tqdm draws on rank 0's stderr when it is a terminal (here a pseudo-terminal)."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))   # a 120-column terminal
    cmd = [sys.executable, os.path.join(ROOT, "train_hvd.py"), "--synthetic", "--synthetic_size", "32",
           "--synthetic_train", "16", "--synthetic_val", "0", "--batch_size", "4", "--epochs", "1",
           "--logdir", str(tmp_path / "logs"), "--export", "none"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=slave, env=mpi_env(), cwd=ROOT)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:        # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert p.wait(timeout=HANG) == 0, out.decode(errors="replace")[-2000:]
    os.close(master)
    text = out.decode(errors="replace")
    assert "epoch 1/1" in text and "step" in text and "4/4" in text, text[-2000:]


def test_histogram_buckets_by_hand():
    from unet.training.reporting import histogram_buckets
    b = histogram_buckets(np.array([[0.0, 1.0], [1.0, 3.0]]), bins=3)   # edges 0, 1, 2, 3
    assert b.tolist() == [[0.0, 1.0, 1.0], [1.0, 2.0, 2.0], [2.0, 3.0, 1.0]]   # the last edge is inclusive
    assert histogram_buckets(np.zeros(5)).tolist() == [[0.0, 0.0, 5.0]]        # a zero-initialised bias
    assert histogram_buckets(np.zeros(0)).shape == (0, 3)
