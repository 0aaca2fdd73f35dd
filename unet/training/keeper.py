"""What training keeps on disk: the latest checkpoints, the best one, and at the end the model.

Only rank 0 writes (the ranks hold the same weights). ``make_keeper`` returns a ``Keeper`` on every
other rank: the same methods, which keep nothing, so a misspelt call fails on every rank alike.
The files themselves (atomic ``.npz`` checkpoints, ``model.keras`` + ``model.json``) are
``unet.training.checkpoint``'s and ``unet.modelfolder``'s.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from unet.modelfolder import save_model
from unet.training import checkpoint

BEST = "best.npz"


@dataclass(frozen=True)
class Kept:
    """The model written at the end: its folder, its metadata and the validation scores of its weights."""
    folder: str
    meta: dict
    val: dict | None


class Keeper:
    """Ranks other than 0: keep nothing."""

    def continue_run(self) -> None:
        """A run goes on (resumed, or a new rank 0 after an elastic reset): the best so far is on disk."""

    def latest(self, model, optimizer, meta: dict, *, step: int, epoch: int, step_in_epoch: int,
               sample_in_epoch: int = 0) -> str | None:
        """Write a checkpoint to resume from (the latest ``keep`` are kept); its path."""
        return None

    def epoch_end(self, model, optimizer, meta: dict, *, step: int, epoch: int,
                  val: dict | None) -> tuple[str | None, bool]:
        """The checkpoint of a finished epoch (``epoch`` counts those done), and the best one if
        ``val`` is the best validation so far: (path of the checkpoint, is it the best)."""
        return None, False

    def final_model(self, model, meta: dict, val: dict | None) -> Kept | None:
        """model.keras + model.json of the best validation epoch (its weights loaded into ``model``),
        else of the last weights."""
        return None


class Rank0Keeper(Keeper):
    def __init__(self, logdir: str, keep: int, epochs: int):
        self.logdir, self.keep, self.epochs = os.path.abspath(logdir), keep, epochs
        self.ckpt_dir = os.path.join(self.logdir, "checkpoints")
        self.best, self.best_val, self.best_epoch = -1.0, None, 0

    def continue_run(self) -> None:
        best = os.path.join(self.ckpt_dir, BEST)
        if os.path.exists(best):
            with np.load(best, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
            self.best, self.best_epoch = float(meta.get("val_dice", -1.0)), int(meta.get("epoch", 0))
            self.best_val = meta.get("val")

    def latest(self, model, optimizer, meta: dict, *, step: int, epoch: int, step_in_epoch: int,
               sample_in_epoch: int = 0) -> str | None:
        return checkpoint.save_checkpoint(self.ckpt_dir, model=model, optimizer=optimizer, step=step, epoch=epoch,
                                          meta=dict(meta, step_in_epoch=step_in_epoch,
                                                    sample_in_epoch=sample_in_epoch), keep=self.keep)

    def epoch_end(self, model, optimizer, meta: dict, *, step: int, epoch: int,
                  val: dict | None) -> tuple[str | None, bool]:
        path = self.latest(model, optimizer, meta, step=step, epoch=epoch, step_in_epoch=0)
        score = float(np.mean(val["dice"])) if val else None
        if score is None or score <= self.best:
            return path, False
        self.best, self.best_val, self.best_epoch = score, val, epoch
        checkpoint.save_checkpoint(self.ckpt_dir, model=model, optimizer=optimizer, step=step, epoch=epoch,
                                   meta=dict(meta, step_in_epoch=0, val_dice=score,
                                             val={"dice": [float(d) for d in val["dice"]],
                                                  "loss": float(val["loss"])}), name=BEST)
        return path, True

    def final_model(self, model, meta: dict, val: dict | None) -> Kept | None:
        best = os.path.join(self.ckpt_dir, BEST)
        if self.best_val is not None and os.path.exists(best):
            # the weights of the best validation epoch (rank 0's copy only; training is over)
            checkpoint.load_checkpoint(best, model=model, optimizer=None)
            val = self.best_val
            meta = dict(meta, exported="best validation epoch %d of %d" % (self.best_epoch, self.epochs))
            print(f"exporting the best validation epoch: {self.best_epoch}", flush=True)
        keras_path, json_path = save_model(self.logdir, model, meta)
        print(f"model: {keras_path} (metadata {json_path})", flush=True)
        return Kept(self.logdir, meta, val)


def make_keeper(is_chief: bool, logdir: str, keep: int, epochs: int) -> Keeper:
    return Rank0Keeper(logdir, keep, epochs) if is_chief else Keeper()
