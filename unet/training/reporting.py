"""Everything only rank 0 does: console, tqdm, training.log, TensorBoard, checkpoints, export.

The training loop calls one reporter object; ``make_reporter`` returns the real
one on rank 0 and a silent one elsewhere. This is the single rank-0 guard.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from unet.modelfolder import save_model
from unet.training import checkpoint


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


class NullReporter:
    """Ranks other than 0: write nothing."""
    wants_images = False

    def __getattr__(self, name):
        return lambda *a, **k: None

    def want_images(self, step: int) -> bool:
        return False


class Rank0Reporter:
    def __init__(self, args, info, size: int, global_batch: int, steps_per_epoch: int):
        import tensorflow as tf
        self.tf, self.args, self.info = tf, args, info
        self.logdir = os.path.abspath(args.logdir)
        os.makedirs(self.logdir, exist_ok=True)
        self.ckpt_dir = os.path.join(self.logdir, "checkpoints")
        self.writer = tf.summary.create_file_writer(os.path.join(self.logdir, "train"))
        self.val_writer = tf.summary.create_file_writer(os.path.join(self.logdir, "validation"))
        self.log = open(os.path.join(self.logdir, "training.log"), "a", buffering=1)
        self.regions = info.region_names
        self.steps_per_epoch = steps_per_epoch
        self.bar = None
        self.t_window, self.n_window = time.perf_counter(), 0
        self.last_rate = 0.0
        self.best, self.best_val, self.best_epoch = -1.0, None, 0
        print(f"training: ranks={size} batch_size/rank={args.batch_size} "
              f"global_batch={global_batch} steps/epoch={steps_per_epoch} epochs={args.epochs} "
              f"input {info.height}x{info.width}x{info.channels} ({','.join(info.modalities)}) "
              f"regions {','.join(info.region_names)}", flush=True)
        print(f"data: {args.data or 'synthetic (in memory)'}", flush=True)
        print(f"logdir: {self.logdir}", flush=True)

    # -- per step -------------------------------------------------------------
    def world(self, before: int | None, size: int, global_batch: int, step: int) -> None:
        """An elastic job re-formed its ring: say so when the number of workers changed."""
        if before and before != size:
            msg = f"workers: {before} -> {size} at step {step} (global batch {global_batch})"
            print(msg, flush=True)
            self.log.write(msg + "\n")

    def keep_best_on_disk(self) -> None:
        """Continue a run (resume, or a new rank 0 after an elastic reset): the best
        validation score so far is the one in ``best.npz``, not this process's memory."""
        best = os.path.join(self.ckpt_dir, "best.npz")
        if os.path.exists(best):
            with np.load(best, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
            self.best, self.best_epoch = float(meta.get("val_dice", -1.0)), int(meta.get("epoch", 0))
            self.best_val = meta.get("val")

    def epoch_start(self, epoch: int) -> None:
        if self.bar is not None:
            self.bar.close()
        from tqdm import tqdm
        self.bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.args.epochs}",
                        unit="step", disable=not sys.stderr.isatty(), leave=False)

    def want_images(self, step: int) -> bool:
        return step % self.args.image_every == 0

    def step(self, step: int, epoch: int, images: int, loss: float, dice: np.ndarray, lr: float) -> None:
        self.n_window += images
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", dice=f"{float(dice[0]):.3f}")
        if step % self.args.log_every:
            return
        now = time.perf_counter()
        self.last_rate = self.n_window / max(now - self.t_window, 1e-9)
        self.t_window, self.n_window = now, 0
        tf = self.tf
        with self.writer.as_default(step=step):
            tf.summary.scalar("loss", loss)
            tf.summary.scalar("learning_rate", lr)
            tf.summary.scalar("img_per_sec", self.last_rate)
            for name, d in zip(self.regions, dice):
                tf.summary.scalar(f"dice_{name}", float(d))
        dices = " ".join(f"dice_{n} {float(d):.4f}" for n, d in zip(self.regions, dice))
        self.log.write(f"step {step} epoch {epoch + 1} loss {loss:.5f} {dices} lr {lr:.6g} "
                       f"img/s {self.last_rate:.2f}\n")

    def images(self, step: int, x: np.ndarray, y: np.ndarray, pred: np.ndarray) -> None:
        tf = self.tf

        def to_img(a):  # (B,H,W,K) -> displayable (B,H,W,1|3) in [0,1]
            a = a[..., :3] if a.shape[-1] >= 3 else a[..., :1]
            lo = a.min(axis=(1, 2, 3), keepdims=True)
            hi = a.max(axis=(1, 2, 3), keepdims=True)
            return (a - lo) / np.maximum(hi - lo, 1e-6)

        with self.writer.as_default(step=step):
            tf.summary.image("input", to_img(x[..., :1]), max_outputs=3)
            tf.summary.image("ground_truth", np.clip(y[..., :3] if y.shape[-1] >= 3 else y[..., :1], 0, 1), max_outputs=3)
            tf.summary.image("prediction", np.clip(pred[..., :3] if pred.shape[-1] >= 3 else pred[..., :1], 0, 1), max_outputs=3)

    # -- per epoch --------------------------------------------------------------
    def epoch_end(self, epoch: int, step: int, model, optimizer, val: dict | None, meta: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        tf = self.tf
        from tensorboard.plugins.histogram.metadata import create_summary_metadata
        histogram = create_summary_metadata("", "")
        with self.writer.as_default(step=step):
            # TensorBoard's histogram summaries, with the buckets counted by numpy: 0.1 s for the
            # 7.8 M weights where tf.summary.histogram's eager ops take 1.9 s (1 thread), every epoch
            for v in model.trainable_variables:
                tf.summary.write(v.path, histogram_buckets(v.numpy()), metadata=histogram)
        msg = f"epoch {epoch + 1}/{self.args.epochs} step {step} img/s {self.last_rate:.2f}"
        if val:
            with self.val_writer.as_default(step=step):
                tf.summary.scalar("loss", val["loss"])
                for name, d in zip(self.regions, val["dice"]):
                    tf.summary.scalar(f"dice_{name}", float(d))
            dices = " ".join(f"dice_{n} {float(d):.4f}" for n, d in zip(self.regions, val["dice"]))
            msg += f" val_loss {val['loss']:.4f} val {dices}"
            self.log.write(f"validation epoch {epoch + 1} step {step} loss {val['loss']:.5f} {dices}\n")
        self.writer.flush()
        self.val_writer.flush()
        path = self.checkpoint(model, optimizer, meta, step=step, epoch=epoch + 1, step_in_epoch=0)
        if val:
            score = float(np.mean(val["dice"]))
            if score > self.best:
                self.best, self.best_val, self.best_epoch = score, val, epoch + 1
                checkpoint.save_checkpoint(self.ckpt_dir, model=model, optimizer=optimizer, step=step,
                                           epoch=epoch + 1, meta=dict(meta, step_in_epoch=0, val_dice=score,
                                                     val={"dice": [float(d) for d in val["dice"]],
                                                          "loss": float(val["loss"])}),
                                           name="best.npz")
                msg += " (best)"
        print(msg + f" checkpoint {os.path.relpath(path, self.logdir)}", flush=True)

    def checkpoint(self, model, optimizer, meta: dict, *, step: int, epoch: int, step_in_epoch: int,
                   sample_in_epoch: int = 0) -> str:
        return checkpoint.save_checkpoint(self.ckpt_dir, model=model, optimizer=optimizer, step=step,
                                          epoch=epoch, meta=dict(meta, step_in_epoch=step_in_epoch,
                                                                 sample_in_epoch=sample_in_epoch),
                                          keep=self.args.keep_checkpoints)

    def resumed(self, step: int, path: str) -> None:
        print(f"resumed from step {step} ({path})", flush=True)
        self.log.write(f"resumed from step {step} ({path})\n")

    def replicas(self, same: bool, digests: list[str], dropout_streams: int | None) -> None:
        if same:
            streams = "" if dropout_streams is None else f"; dropout: {dropout_streams} distinct random streams"
            print(f"weights: identical on {len(digests)} ranks (sha256 {digests[0][:16]}){streams}", flush=True)
        else:
            print("weights: DIFFER across ranks: " + " ".join(f"rank{i}={d[:12]}" for i, d in enumerate(digests)),
                  file=sys.stderr, flush=True)

    def finish(self, model, meta: dict, val: dict | None, export=None) -> None:
        best = os.path.join(self.ckpt_dir, "best.npz")
        if self.best_val is not None and os.path.exists(best):
            # export the weights of the best validation epoch (rank 0's copy only; training is over)
            checkpoint.load_checkpoint(best, model=model, optimizer=None)
            val = self.best_val
            meta = dict(meta, exported="best validation epoch %d of %d" % (self.best_epoch, self.args.epochs))
            print(f"exporting the best validation epoch: {self.best_epoch}", flush=True)
        keras_path, json_path = save_model(self.logdir, model, meta)
        self.writer.close()
        self.val_writer.close()
        self.log.close()
        print(f"model: {keras_path} (metadata {json_path})", flush=True)
        if self.args.export_formats and export:   # the same weights for the inference engines
            export(self.logdir, model, meta, self.args.export_formats)
        print(f"tensorboard: tensorboard --logdir {self.logdir} --host 127.0.0.1", flush=True)
        if val:
            dices = " ".join(f"{n}={float(d):.4f}" for n, d in zip(self.regions, val["dice"]))
            print(f"validation Dice of the exported model (slice-pooled, threshold 0.5): {dices}", flush=True)


def make_reporter(is_chief: bool, *args, **kwargs):
    return Rank0Reporter(*args, **kwargs) if is_chief else NullReporter()

