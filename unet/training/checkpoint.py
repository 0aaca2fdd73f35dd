"""Checkpoints, written atomically (temporary name, fsync, rename; the model folder is ``unet.modelfolder``).

A checkpoint is an ``.npz`` of plain arrays (no pickle): model variables
``m000...``, optimizer variables ``o000...`` and a JSON ``meta`` string with
the global step, epoch and the data shape it was trained on.
"""
from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

from unet.distributed.ranks import broadcast_from_root
from unet.errors import UsageError
from unet.modelfolder import atomic_write

CKPT_RE = re.compile(r"ckpt-(\d+)\.npz$")


def list_checkpoints(folder: str) -> list[str]:
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(folder, "ckpt-*.npz"))
             if (m := CKPT_RE.search(p))]
    return [p for _, p in sorted(found)]


def save_checkpoint(folder: str, *, model, optimizer, step: int, epoch: int, meta: dict,
                    keep: int = 3, name: str | None = None) -> str:
    """Write ``ckpt-<step>.npz`` (or ``name``) atomically and keep the latest ``keep`` of them."""
    os.makedirs(folder, exist_ok=True)
    arrays = {f"m{i:03d}": np.asarray(v.numpy()) for i, v in enumerate(model.variables)}
    arrays.update({f"o{i:03d}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)})
    arrays["meta"] = np.array(json.dumps(dict(meta, step=step, epoch=epoch)))
    path = os.path.join(folder, name or f"ckpt-{step:08d}.npz")
    atomic_write(path, lambda fh: np.savez(fh, **arrays))
    for old in ([] if name else list_checkpoints(folder)[:-keep]):
        os.unlink(old)
    return path


def resume_path(logdir: str, resume: str | None, fresh: bool) -> str | None:
    """The checkpoint a run starts from: --resume, else the latest under logdir, unless --fresh."""
    if fresh:
        return None
    if resume:
        return resume
    found = list_checkpoints(os.path.join(logdir, "checkpoints"))
    return found[-1] if found else None


def load_checkpoint(path: str, *, model, optimizer) -> dict:
    """Restore variables in place (the optimizer's too unless it is None);
    raise ValueError naming the file on any mismatch."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:120]})") from None
    with z:
        if "meta" not in z.files:
            raise ValueError(f"{path}: not a unet-hvd checkpoint (no meta)")
        meta = json.loads(str(z["meta"]))
        groups = [("m", model.variables)] + ([("o", optimizer.variables)] if optimizer is not None else [])
        for prefix, variables in groups:
            names = sorted(k for k in z.files if k.startswith(prefix) and k[1:].isdigit())
            if len(names) != len(variables):
                raise ValueError(f"{path}: {len(names)} {prefix}-variables, model has {len(variables)}")
            for name, var in zip(names, variables):
                if tuple(z[name].shape) != tuple(var.shape):
                    raise ValueError(f"{path}: checkpoint of another model ({var.path} has shape "
                                     f"{tuple(var.shape)} here, {tuple(z[name].shape)} in the file)")
            for name, var in zip(names, variables):
                var.assign(z[name])
    return meta


def check_same_data(meta: dict, data: dict, data_name: str) -> None:
    """Refuse to continue a checkpoint on data of another shape (ValueError, one line)."""
    keys = ("height", "width", "channels", "regions")
    was = meta.get("data", {})
    if any(k in was and was[k] != data[k] for k in keys):
        shape = lambda d: "{height}x{width}x{channels} -> {regions} region(s)".format(**d)
        raise ValueError(f"{meta.get('path', 'checkpoint')}: trained on {shape(was)}, "
                         f"but {data_name} is {shape(data)}")


def position(meta: dict | None) -> dict:
    """Where a restored checkpoint left off (none: the start): epoch, global step, steps and samples
    done in the epoch (a checkpoint older than ``sample_in_epoch``: its steps x global batch)."""
    if not meta:
        return {}
    step_in_epoch = meta.get("step_in_epoch", 0)
    return {"epoch": meta["epoch"], "step": meta["step"], "step_in_epoch": step_in_epoch,
            "sample": meta.get("sample_in_epoch", step_in_epoch * meta.get("global_batch", 0))}


def restore_or_broadcast(hvd, model, optimizer, path: str | None, data: dict, data_name: str,
                         elastic: bool) -> dict | None:
    """Start every rank from the same state: rank 0 restores ``path`` (None: a fresh start), checked against
    ``data`` (the shape trained on); every rank learns the outcome and takes rank 0's weights and optimizer
    state. Returns the checkpoint's metadata (with its ``path``), or None; a UsageError on every rank if
    it cannot be used. Elastic: no collective may run before the elastic loop (a worker joining later
    would wait in it forever), so every worker restores for itself and the loop's first sync gives all of
    them rank 0's state."""
    restored = None
    if path and (hvd.rank() == 0 or elastic):
        try:
            restored = dict(load_checkpoint(path, model=model, optimizer=optimizer), path=path)
            check_same_data(restored, data, data_name)
        except ValueError as e:
            restored = {"error": str(e)}
    if not elastic:
        restored = hvd.broadcast_object(restored, root_rank=0)
    if restored and "error" in restored:   # elastic: each worker found it alone, and says so
        raise UsageError(restored["error"], local=elastic)
    if not elastic:
        # Horovod: every rank starts from rank 0's weights and optimizer state, fresh or restored.
        broadcast_from_root(hvd, model, optimizer)
    return restored
