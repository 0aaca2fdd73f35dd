"""Writes checkpoints in a loop with the real writer until killed (for test_checkpoint_kill)."""
import sys

import numpy as np

from unet.training.checkpoint import save_checkpoint


class Var:
    def __init__(self, a):
        self.a, self.shape, self.path = a, a.shape, "v"

    def numpy(self):
        return self.a


class Holder:
    def __init__(self, arrays):
        self.variables = [Var(a) for a in arrays]


folder = sys.argv[1]
step = 0
while True:
    step += 1
    rng = np.random.default_rng(step)
    arrays = [np.full((256, 1024), step, np.float32) for _ in range(8)]     # 8 MB per checkpoint
    save_checkpoint(folder, model=Holder(arrays), optimizer=Holder([rng.random(1000)]), step=step,
                    epoch=0, meta={}, keep=2)
