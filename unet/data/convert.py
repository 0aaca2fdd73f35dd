"""unet-convert: BraTS / BraTS 2023 / MSD NIfTI cases -> one HDF5 file (or the seed's npy files).

    unet-convert --input DIR --output data.h5 [--size 128] [--workers N]
    mpirun -np 4 unet-convert --input DIR --output data.h5   # cases split over ranks

Cases are read with SimpleITK one at a time (memory does not grow with the
number of cases), split by patient into train/val, normalised (z-score over
brain voxels per modality), brought in-plane to --size with OpenCV (masks by
nearest neighbour) and written as axial slices. The output appears under its
final name only when complete.

``--folds K``: the training cases are also dealt into K folds balanced by tumour
volume (``assign_folds``), recorded per case; their slices --slices leaves out are
kept too (group ``rest``, ``unet.data.h5io``), so ``train_hvd.py --fold k`` validates
on every slice of fold k's cases and trains on the other folds, from the one file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zlib
from dataclasses import dataclass

import numpy as np

from unet.cli import command
from unet.data import labels as L
from unet.data import preprocess as P
from unet.data.h5io import H5Writer, merge_parts, write_folds, write_npy
from unet.data.layouts import MODALITIES, Case, detect_layout, find_cases
from unet.data.nifti import DataError, Options, read_case
from unet.distributed.ranks import agree, world
from unet.errors import UsageError

CONVERTER_VERSION = "2"   # 2: masks resized centre-aligned (INTER_NEAREST_EXACT), as the images are


def process_case(case: Case, opts: Options, split: str, rest: bool = False) -> dict:
    """Read, normalise, resample in-plane and slice one case (runs in a worker); ``rest``: a
    training case also returns the slices --slices leaves out (under "rest"). "wt_ml" is the
    whole tumour's volume in millilitres."""
    chans, seg, geom = read_case(case, opts)
    brain, plan, slices = P.network_input(chans, opts.size, opts.inplane)   # what unet-predict feeds the model
    regions = L.regions_from_labels(seg, case.layout, opts.regions)
    tumour = np.isin(seg, L.REGION_LABELS[case.layout]["WT"])
    rng = np.random.default_rng([opts.seed, zlib.crc32(case.case_id.encode())])
    keep = P.select_slices(brain, tumour, "all" if split == "val" else opts.slices, rng,
                           opts.background_fraction)

    def pick(zs) -> dict:
        msks = np.stack([P.apply_inplane(regions[z], plan, is_mask=True) for z in zs]) \
            if len(zs) else np.zeros((0, opts.size, opts.size, len(opts.regions)), np.uint8)
        return {"images": slices[np.asarray(zs, int)].astype(np.float32), "masks": msks.astype(np.uint8),
                "slice_index": np.asarray(zs, np.int32)}

    out = dict(pick(keep), case_id=case.case_id, split=split, geometry=dict(geom, plan=plan, slices=len(keep)),
               wt_ml=float(tumour.sum()) * float(np.prod(geom["spacing"])) / 1000.0)
    if rest and split == "train":
        out["rest"] = pick(np.setdiff1d(np.arange(len(slices)), keep))
    return out


def split_by_patient(case_ids: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """case id -> 'train' | 'val'; deterministic by seed, no case in both."""
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = int(math.ceil(val_fraction * len(ids))) if val_fraction > 0 else 0
    if len(ids) >= 2:
        n_val = min(max(n_val, 1 if val_fraction > 0 else 0), len(ids) - 1)
    val = {ids[i] for i in order[:n_val]}
    return {c: ("val" if c in val else "train") for c in ids}


def assign_folds(volumes: dict[str, float], k: int, seed: int) -> dict[str, int]:
    """Case id -> fold in [0, k), balanced by tumour volume: the cases sorted by volume (ties by id)
    are dealt in blocks of ``k``, each block to the folds in an order drawn from ``seed``. Every
    fold holds one case of each full block (so each spans the range of volumes) and fold sizes
    differ by at most one."""
    if k < 2:
        raise ValueError(f"k must be >= 2 (got {k})")
    order = sorted(volumes, key=lambda c: (volumes[c], c))
    rng = np.random.default_rng([seed, 4099])
    out = {}
    for b in range(0, len(order), k):
        block = order[b:b + k]
        for case, fold in zip(block, rng.permutation(k)[:len(block)]):
            out[case] = int(fold)
    return out


def _iter_results(cases, opts, splits, workers, rest=False):
    """Yield (case, result | DataError) in case order, at most 2*workers cases in flight."""
    if workers <= 1:
        for c in cases:
            yield c, _worker(c, opts, splits[c.case_id], rest)
        return
    import multiprocessing as mp
    from collections import deque
    with mp.get_context("fork").Pool(workers) as pool:
        pending = deque()
        it = iter(cases)
        for c in it:
            pending.append((c, pool.apply_async(_worker, (c, opts, splits[c.case_id], rest))))
            if len(pending) >= 2 * workers:
                break
        while pending:
            c, fut = pending.popleft()
            yield c, fut.get()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.apply_async(_worker, (nxt, opts, splits[nxt.case_id], rest))))


def _worker(case, opts, split, rest=False):
    try:
        return process_case(case, opts, split, rest)
    except DataError as e:
        return e


def convert_to(path: str, cases, opts: Options, splits, *, workers: int, skip_bad: bool, progress: bool,
               rest: bool = False):
    """Write all ``cases`` into a new HDF5 file at ``path`` (``rest``: with the training slices
    --slices leaves out, for folds); returns (slices per split, [(case id, error) of each skipped
    case], {case id: whole-tumour volume in ml})."""
    from tqdm import tqdm
    w = H5Writer(path, opts.size, len(opts.modalities), len(opts.regions), rest=rest)
    counts, skipped, volumes = {"train": 0, "val": 0}, [], {}
    try:
        bar = tqdm(total=len(cases), unit="case", disable=not progress, desc="converting")
        for case, r in _iter_results(cases, opts, splits, workers, rest):
            bar.update(1)
            if isinstance(r, DataError):
                if not skip_bad:
                    raise r
                skipped.append((case.case_id, str(r)))
                continue
            w.append(r)
            counts[r["split"]] += len(r["slice_index"])
            volumes[r["case_id"]] = r["wt_ml"]
        bar.close()
    finally:
        w.close({})
    return counts, skipped, volumes


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """'(default: X)' appended once: not when the help already states its default, nor for None/False."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unet-convert", description=__doc__.split("\n\n")[0], formatter_class=_Help)
    p.add_argument("--input", required=True, help="dataset root (BraTS 2017-22, BraTS 2023 GLI or MSD Task01)")
    p.add_argument("--output", required=True, help="output .h5 file, or folder for --format npy")
    p.add_argument("--format", choices=("h5", "npy"), default="h5",
                   help="h5: one HDF5 file; npy: the seed's imgs/msks_{train,test}.npy")
    p.add_argument("--layout", choices=("auto", "brats", "brats2023", "msd"), default="auto",
                   help="input layout; auto-detected by file names")
    p.add_argument("--modalities", default=None,
                   help="comma list in channel order from FLAIR,T1,T1ce,T2 (default: all four for h5, "
                        "FLAIR for npy)")
    p.add_argument("--regions", default=None,
                   help="comma list from WT,TC,ET (default: WT,TC,ET for h5, WT for npy)")
    p.add_argument("--size", type=int, default=128,
                   help="in-plane size in pixels (multiple of 16); 240 keeps the BraTS grid untouched")
    p.add_argument("--inplane", choices=P.INPLANE_MODES, default="resize",
                   help="resize the whole slice (keeps all the brain), centre-crop it, or crop_resize: cut the "
                        f"square around the case's head (non-zero voxels of all modalities, {P.CROP_MARGIN} voxels "
                        "of margin) and resize that, so the head fills the input")
    p.add_argument("--slices", choices=("all", "brain", "tumour"), default="brain",
                   help="training slices kept: all; brain (the default: those with brain, which drops the "
                        "empty slices above/below the head and keeps the class balance inference sees); "
                        "tumour: slices with tumour plus --background_fraction of the others. "
                        "Validation keeps all.")
    p.add_argument("--background_fraction", type=float, default=0.1,
                   help="--slices tumour: fraction of tumour-free brain slices kept")
    p.add_argument("--val_fraction", type=float, default=0.2, help="fraction of patients for validation")
    p.add_argument("--seed", type=int, default=816, help="seed of the patient split and of the folds")
    p.add_argument("--folds", type=int, default=0,
                   help="deal the training cases (those --val_fraction leaves) into this many folds for "
                        "cross-validation (train_hvd.py --fold k), balanced by whole-tumour volume; 0 = no "
                        "folds. --val_fraction 0 --folds 5 is BraTS's 5-fold cross-validation on every case")
    p.add_argument("--workers", type=int, default=1, help="processes converting cases in parallel (one machine)")
    p.add_argument("--skip_bad", action="store_true", help="skip bad cases, list them at the end")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _opts(a) -> Options:
    fmt_default = ("FLAIR", "WT") if a.format == "npy" else (",".join(MODALITIES), ",".join(L.REGIONS))
    mods = tuple(x.strip() for x in (a.modalities or fmt_default[0]).split(",") if x.strip())
    regs = tuple(x.strip() for x in (a.regions or fmt_default[1]).split(",") if x.strip())
    for m in mods:
        if m not in MODALITIES:
            raise UsageError(f"--modalities: unknown modality {m!r} (choose from {','.join(MODALITIES)})")
    for r in regs:
        if r not in L.REGIONS:
            raise UsageError(f"--regions: unknown region {r!r} (choose from WT,TC,ET)")
    if len(set(mods)) != len(mods) or not mods:
        raise UsageError("--modalities: give each modality once")
    if len(set(regs)) != len(regs) or not regs:
        raise UsageError("--regions: give each region once")
    if a.size < 16 or a.size % 16:
        raise UsageError(f"--size must be a multiple of 16 (got {a.size})")
    if not 0 <= a.val_fraction < 1:
        raise UsageError(f"--val_fraction must be in [0, 1) (got {a.val_fraction})")
    if a.workers < 1:
        raise UsageError(f"--workers must be >= 1 (got {a.workers})")
    if a.folds == 1 or a.folds < 0:
        raise UsageError(f"--folds must be 0 (no folds) or >= 2 (got {a.folds})")
    if a.folds and a.format != "h5":
        raise UsageError("--folds needs --format h5 (the npy files have no place for folds)")
    return Options(mods, regs, a.size, a.inplane, a.slices, a.background_fraction, a.seed)


@dataclass(frozen=True)
class Target:
    """What is written where, and what the file records of the request (from the flags)."""
    output: str                  # absolute: the HDF5 file, or the folder of the npy files
    format: str                  # h5 or npy
    source: str                  # absolute: the input folder
    val_fraction: float
    seed: int
    folds: int                   # 0: no folds

    @property
    def h5(self) -> str:
        """The HDF5 file written (for npy, a hidden one in the output folder, removed after)."""
        return self.output if self.format == "h5" else os.path.join(self.output, ".unet-convert.h5")


@command("unet-convert")
def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    comm = world()
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm else (0, 1)
    opts = _opts(a)           # every rank finds the same bad flag or input folder
    layout = detect_layout(a.input) if a.layout == "auto" else a.layout
    cases = find_cases(a.input, layout)
    if not cases:
        raise UsageError(f"{a.input}: no cases found for layout {layout}")
    splits = split_by_patient([c.case_id for c in cases], a.val_fraction, a.seed)
    n_train = sum(s == "train" for s in splits.values())
    if a.folds > n_train:
        raise UsageError(f"--folds {a.folds}: more folds than the {n_train} training case(s) of {a.input} "
                         f"(--val_fraction {a.val_fraction} keeps {len(cases) - n_train} for validation)")
    target = Target(os.path.abspath(a.output), a.format, os.path.abspath(a.input), a.val_fraction, a.seed, a.folds)
    h5_final = target.h5
    os.makedirs(os.path.dirname(h5_final) or ".", exist_ok=True)
    tmp = f"{h5_final}.part{rank}-of-{size}.tmp"
    error = None
    try:
        counts, skipped, volumes = convert_to(
            tmp, cases[rank::size], opts, splits, workers=a.workers, skip_bad=a.skip_bad, rest=bool(a.folds),
            progress=(rank == 0 and not a.no_progress and sys.stderr.isatty()))
    except DataError as e:
        error, counts, skipped, volumes = str(e), {}, [], {}
    error = agree(comm, error)   # the first error any rank found, on every rank: all exit together
    if comm:
        skipped = sum(comm.allgather(skipped), [])
        totals = comm.allgather(counts)
        volumes = {k: v for part in comm.allgather(volumes) for k, v in part.items()}
    else:
        totals = [counts]
    parts = [f"{h5_final}.part{r}-of-{size}.tmp" for r in range(size)]
    try:
        if error:
            raise UsageError(error)      # agreed: the same on every rank
        folds = None
        if a.folds:
            train_volumes = {c: v for c, v in volumes.items() if splits[c] == "train"}
            if len(train_volumes) < a.folds:
                raise UsageError(f"--folds {a.folds}: only {len(train_volumes)} training case(s) left after "
                                 f"--skip_bad skipped {len(skipped)}")
            folds = assign_folds(train_volumes, a.folds, a.seed)
        if rank == 0:
            _finish(target, opts, layout, cases, splits, parts, tmp, totals, skipped, volumes, folds)
        return 0
    finally:
        if comm:
            comm.Barrier()  # rank 0 has finished reading every part
        try:  # each rank removes only its own part: no two ranks race on one file
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _finish(t: Target, opts, layout, cases, splits, parts, tmp, totals, skipped, volumes, folds) -> None:
    """Rank 0: merge the parts, add the attributes (and folds), rename into place, say what was written."""
    import h5py
    h5_final, out = t.h5, t.output
    attrs = {"modalities": json.dumps(list(opts.modalities)), "regions": json.dumps(list(opts.regions)),
             "size": opts.size, "normalisation": P.NORMALISATION,
             "inplane": opts.inplane, "slices_train": opts.slices, "slices_val": "all",
             **({"crop_margin": P.CROP_MARGIN} if opts.inplane == "crop_resize" else {}),
             "layout": layout, "converter_version": CONVERTER_VERSION,
             "val_fraction": t.val_fraction, "seed": t.seed, "source": t.source}
    staged = f"{h5_final}.tmp-{os.getpid()}"
    if len(parts) > 1:
        merge_parts(parts, staged, opts, rest=bool(folds))
    else:
        os.replace(tmp, staged)
    with h5py.File(staged, "a") as f:
        for k, v in attrs.items():
            f.attrs[k] = v
        if folds:
            write_folds(f, t.folds, folds, volumes)
    os.replace(staged, h5_final)  # only a complete file gets the final name
    n_train = sum(t.get("train", 0) for t in totals)
    n_val = sum(t.get("val", 0) for t in totals)
    bad_ids = {cid for cid, _ in skipped}
    n_cases = {s: sum(1 for c in cases if splits[c.case_id] == s and c.case_id not in bad_ids)
               for s in ("train", "val")}
    if t.format == "npy":
        files = write_npy(h5_final, out)
        os.unlink(h5_final)
        where = ", ".join(os.path.basename(f) for f in files) + f" in {out}"
    else:
        where = out
    print(f"unet-convert: {len(cases) - len(skipped)} cases ({layout}) -> {where}: "
          f"train {n_train} slices from {n_cases['train']} cases, val {n_val} slices from "
          f"{n_cases['val']} cases, {opts.size}x{opts.size}, channels {','.join(opts.modalities)}, "
          f"regions {','.join(opts.regions)}")
    if folds:
        print(f"unet-convert: {fold_summary(folds, volumes, t.folds)}")
    if skipped:
        print(f"unet-convert: skipped {len(skipped)} bad case(s):", file=sys.stderr)
        for _, why in skipped:
            print(f"  {why}", file=sys.stderr)


def fold_summary(folds: dict[str, int], volumes: dict[str, float], k: int) -> str:
    """One line: cases and mean whole-tumour volume per fold."""
    each = []
    for f in range(k):
        v = [volumes[c] for c, g in folds.items() if g == f]
        each.append(f"{f}: {len(v)} case(s), WT {np.mean(v):.1f} ml")
    return f"{k} folds of the training cases (by whole-tumour volume): " + "; ".join(each)


if __name__ == "__main__":
    sys.exit(main())
