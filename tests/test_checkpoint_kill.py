"""Killing the checkpoint writer at random moments never leaves a latest checkpoint that fails to load."""
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
from conftest import HANG, ROOT

from unet.training.checkpoint import list_checkpoints


def test_latest_checkpoint_always_loads_after_sigkill(tmp_path):
    rnd = random.Random(1234)
    env = dict(os.environ, PYTHONPATH=ROOT)
    for attempt in range(20):
        folder = tmp_path / f"try{attempt}"
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "mpi_scripts", "ckpt_writer.py"),
                                 str(folder)], env=env)
        deadline = time.time() + HANG         # wait for the first save, then kill at a random moment
        while not list_checkpoints(str(folder)) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rnd.random())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        found = list_checkpoints(str(folder))
        assert found, f"try {attempt}: no checkpoint written"
        latest = found[-1]
        step = int(os.path.basename(latest)[5:13])
        with np.load(latest, allow_pickle=False) as z:     # complete and consistent
            assert all(np.all(z[f"m{i:03d}"] == step) for i in range(8))
            assert z["o000"].shape == (1000,) and '"step": %d' % step in str(z["meta"])
        assert len(found) <= 3     # keep=2, plus one more if killed between rename and pruning
