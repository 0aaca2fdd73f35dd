"""What training logs: the console, tqdm, training.log and TensorBoard, on rank 0 only.

The loop calls one reporter; ``make_reporter`` returns a ``Rank0Reporter`` on rank 0 and a ``Reporter``
elsewhere, whose methods are the same and log nothing, so a misspelt call fails on every rank alike
(not on rank 0 alone, the others waiting for it until the watchdog ends them). This is the single
rank-0 guard of the logging; what is kept on disk (checkpoints, the model) is ``unet.training.keeper``'s.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LogOptions:
    """What rank 0 logs, and where (from the trainer's flags)."""
    logdir: str               # --logdir: training.log and TensorBoard's train/ and validation/ under it
    epochs: int               # --epochs, for "epoch 3/10"
    batch_size: int           # --batch_size, images per rank per step
    data: str | None          # --data, None for --synthetic
    log_every: int = 10       # steps between scalar summaries and training.log lines
    image_every: int = 100    # steps between image summaries
    conv_grad: str = ""       # how the convolutions' gradients run, e.g. "forward (auto)"; set once TensorFlow is up


def histogram_buckets(values, bins: int = 30) -> np.ndarray:
    """(k, 3) float64 rows (left edge, right edge, count) over the range of ``values``: the tensor a
    TensorBoard histogram summary holds; one bucket when all values are equal, none when there are none."""
    v = np.asarray(values, np.float64).ravel()
    if v.size == 0:
        return np.zeros((0, 3))
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return np.array([[lo, hi, float(v.size)]])
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    return np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)


def to_image(a: np.ndarray) -> np.ndarray:
    """(B,H,W,K) input channels -> displayable (B,H,W,1|3) in [0, 1], each image stretched to its range."""
    a = a[..., :3] if a.shape[-1] >= 3 else a[..., :1]
    lo = a.min(axis=(1, 2, 3), keepdims=True)
    hi = a.max(axis=(1, 2, 3), keepdims=True)
    return (a - lo) / np.maximum(hi - lo, 1e-6)


def as_colours(a: np.ndarray) -> np.ndarray:
    """(B,H,W,R) masks or probabilities -> (B,H,W,1|3): the first three regions as red, green, blue."""
    return np.clip(a[..., :3] if a.shape[-1] >= 3 else a[..., :1], 0, 1)


def dices(regions, dice) -> str:
    """``dice_WT 0.9012 dice_TC ...``: the Dice of each region, as training.log and the console write them."""
    return " ".join(f"dice_{n} {float(d):.4f}" for n, d in zip(regions, dice))


class Reporter:
    """Ranks other than 0: log nothing."""

    def world(self, before: int | None, size: int, global_batch: int, step: int) -> None:
        """The ring (re)formed with ``size`` workers; ``before``: how many it had (None at the start)."""

    def resumed(self, step: int, path: str) -> None:
        """Training continues from the checkpoint ``path`` at global step ``step``."""

    def epoch_start(self, epoch: int) -> None:
        """Epoch ``epoch`` (0-based) begins."""

    def want_images(self, step: int) -> bool:
        """Should the loop hand ``images`` a few predictions at this step?"""
        return False

    def step(self, step: int, epoch: int, images: int, loss: float, dice: np.ndarray, lr: float) -> None:
        """One optimizer step done: global loss and Dice per region, ``images`` in the global batch."""

    def images(self, step: int, x: np.ndarray, y: np.ndarray, pred: np.ndarray) -> None:
        """Input, ground truth and prediction of a few slices."""

    def epoch_end(self, epoch: int, step: int, model, val: dict | None, checkpoint: str | None,
                  best: bool) -> None:
        """Epoch ``epoch`` (0-based) ended: its weights, its validation (if any), the checkpoint kept."""

    def replicas(self, same: bool, digests: list[str], dropout_streams: int | None) -> None:
        """Do all ranks hold the same weights (their sha256), and how many dropout streams ran."""

    def finish(self, val: dict | None) -> None:
        """Training is over; ``val``: the validation scores of the model written."""


class Board:
    """TensorBoard event files under the logdir: ``train/`` (steps, images, weights) and ``validation/``."""

    def __init__(self, logdir: str, regions):
        import tensorflow as tf
        from tensorboard.plugins.histogram.metadata import create_summary_metadata
        self.tf, self.regions = tf, regions
        self.train = tf.summary.create_file_writer(os.path.join(logdir, "train"))
        self.validation = tf.summary.create_file_writer(os.path.join(logdir, "validation"))
        self.histogram = create_summary_metadata("", "")        # of the weights, every epoch

    def scalars(self, writer, step: int, loss: float, dice, **more) -> None:
        with writer.as_default(step=step):
            self.tf.summary.scalar("loss", loss)
            for name, value in more.items():
                self.tf.summary.scalar(name, value)
            for name, d in zip(self.regions, dice):
                self.tf.summary.scalar(f"dice_{name}", float(d))

    def images(self, step: int, x: np.ndarray, y: np.ndarray, pred: np.ndarray) -> None:
        with self.train.as_default(step=step):
            self.tf.summary.image("input", to_image(x[..., :1]), max_outputs=3)
            self.tf.summary.image("ground_truth", as_colours(y), max_outputs=3)
            self.tf.summary.image("prediction", as_colours(pred), max_outputs=3)

    def weights(self, step: int, model) -> None:
        with self.train.as_default(step=step):
            # TensorBoard's histogram summaries, with the buckets counted by numpy: 0.1 s for the
            # 7.8 M weights where tf.summary.histogram's eager ops take 1.9 s (1 thread), every epoch
            for v in model.trainable_variables:
                self.tf.summary.write(v.path, histogram_buckets(v.numpy()), metadata=self.histogram)

    def flush(self) -> None:
        self.train.flush()
        self.validation.flush()

    def close(self) -> None:
        self.train.close()
        self.validation.close()


def start_lines(opts: LogOptions, info, size: int, global_batch: int, steps_per_epoch: int, logdir: str) -> list:
    """The lines rank 0 prints before the first step: the run's shape, its data, its logdir."""
    return [f"training: ranks={size} batch_size/rank={opts.batch_size} global_batch={global_batch} "
            f"steps/epoch={steps_per_epoch} epochs={opts.epochs} input {info.height}x{info.width}x{info.channels} "
            f"({','.join(info.modalities)}) regions {','.join(info.region_names)}"
            + (f" conv_grad {opts.conv_grad}" if opts.conv_grad else ""),
            f"data: {opts.data or 'synthetic (in memory)'}", f"logdir: {logdir}"]


class EpochBar:
    """tqdm's bar over an epoch's steps on a terminal (loss and the first region's Dice beside it)."""
    def __init__(self, steps_per_epoch: int, epochs: int):
        self.steps, self.epochs, self.bar = steps_per_epoch, epochs, None

    def start(self, epoch: int) -> None:
        self.close()
        from tqdm import tqdm
        self.bar = tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{self.epochs}", unit="step",
                        disable=not sys.stderr.isatty(), leave=False)

    def step(self, loss: float, dice: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", dice=f"{dice:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Rank0Reporter(Reporter):
    def __init__(self, opts: LogOptions, info, size: int, global_batch: int, steps_per_epoch: int):
        self.opts, self.regions, self.steps_per_epoch = opts, info.region_names, steps_per_epoch
        self.logdir = os.path.abspath(opts.logdir)
        os.makedirs(self.logdir, exist_ok=True)
        self.board = Board(self.logdir, self.regions)
        self.log = open(os.path.join(self.logdir, "training.log"), "a", buffering=1)
        self.bar, self.last_rate = EpochBar(steps_per_epoch, opts.epochs), 0.0
        self.t_window, self.n_window = time.perf_counter(), 0
        for line in start_lines(opts, info, size, global_batch, steps_per_epoch, self.logdir):
            print(line, flush=True)

    def _say(self, line: str) -> None:
        print(line, flush=True)
        self.log.write(line + "\n")

    def world(self, before: int | None, size: int, global_batch: int, step: int) -> None:
        if before and before != size:
            self._say(f"workers: {before} -> {size} at step {step} (global batch {global_batch})")

    def resumed(self, step: int, path: str) -> None:
        self._say(f"resumed from step {step} ({path})")

    def epoch_start(self, epoch: int) -> None:
        self.bar.start(epoch)

    def want_images(self, step: int) -> bool:
        return step % self.opts.image_every == 0

    def step(self, step: int, epoch: int, images: int, loss: float, dice: np.ndarray, lr: float) -> None:
        self.n_window += images
        self.bar.step(loss, float(dice[0]))
        if step % self.opts.log_every:
            return
        now = time.perf_counter()
        self.last_rate = self.n_window / max(now - self.t_window, 1e-9)
        self.t_window, self.n_window = now, 0
        self.board.scalars(self.board.train, step, loss, dice, learning_rate=lr, img_per_sec=self.last_rate)
        self.log.write(f"step {step} epoch {epoch + 1} loss {loss:.5f} {dices(self.regions, dice)} lr {lr:.6g} "
                       f"img/s {self.last_rate:.2f}\n")

    def images(self, step: int, x: np.ndarray, y: np.ndarray, pred: np.ndarray) -> None:
        self.board.images(step, x, y, pred)

    def epoch_end(self, epoch: int, step: int, model, val: dict | None, checkpoint: str | None,
                  best: bool) -> None:
        self.bar.close()
        self.board.weights(step, model)
        msg = f"epoch {epoch + 1}/{self.opts.epochs} step {step} img/s {self.last_rate:.2f}"
        if val:
            self.board.scalars(self.board.validation, step, val["loss"], val["dice"])
            msg += f" val_loss {val['loss']:.4f} val {dices(self.regions, val['dice'])}"
            self.log.write(f"validation epoch {epoch + 1} step {step} loss {val['loss']:.5f} "
                           f"{dices(self.regions, val['dice'])}\n")
        self.board.flush()
        print(msg + (" (best)" if best else "") + f" checkpoint {os.path.relpath(checkpoint, self.logdir)}",
              flush=True)

    def replicas(self, same: bool, digests: list[str], dropout_streams: int | None) -> None:
        if same:
            streams = "" if dropout_streams is None else f"; dropout: {dropout_streams} distinct random streams"
            print(f"weights: identical on {len(digests)} ranks (sha256 {digests[0][:16]}){streams}", flush=True)
        else:
            print("weights: DIFFER across ranks: " + " ".join(f"rank{i}={d[:12]}" for i, d in enumerate(digests)),
                  file=sys.stderr, flush=True)

    def finish(self, val: dict | None) -> None:
        self.board.close()
        self.log.close()
        print(f"tensorboard: tensorboard --logdir {self.logdir} --host 127.0.0.1", flush=True)
        if val:
            each = " ".join(f"{n}={float(d):.4f}" for n, d in zip(self.regions, val["dice"]))
            print(f"validation Dice of the exported model (slice-pooled, threshold 0.5): {each}", flush=True)


def make_reporter(is_chief: bool, *args, **kwargs) -> Reporter:
    return Rank0Reporter(*args, **kwargs) if is_chief else Reporter()
