"""unet-convert: BraTS / BraTS 2023 / MSD NIfTI cases -> one HDF5 file (or the seed's npy files).

    unet-convert --input DIR --output data.h5 [--size 128] [--workers N]
    mpirun -np 4 unet-convert --input DIR --output data.h5   # cases split over ranks

Cases are read with SimpleITK one at a time (memory does not grow with the
number of cases), split by patient into train/val, normalised (z-score over
brain voxels per modality), brought in-plane to --size with OpenCV (masks by
nearest neighbour) and written as axial slices. The output appears under its
final name only when complete.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zlib

import numpy as np

from unet.data import labels as L
from unet.data import preprocess as P
from unet.data.h5io import H5Writer, merge_parts, write_npy
from unet.data.layouts import MODALITIES, Case, detect_layout, find_cases
from unet.data.nifti import DataError, Options, read_case
from unet.cli import command
from unet.distributed.ranks import agree, world
from unet.errors import UsageError

CONVERTER_VERSION = "2"   # 2: masks resized centre-aligned (INTER_NEAREST_EXACT), as the images are


def process_case(case: Case, opts: Options, split: str) -> dict:
    """Read, normalise, resample in-plane and slice one case (runs in a worker)."""
    chans, seg, geom = read_case(case, opts)
    brain, plan, slices = P.network_input(chans, opts.size, opts.inplane)   # what unet-predict feeds the model
    regions = L.regions_from_labels(seg, case.layout, opts.regions)
    tumour = np.isin(seg, L.REGION_LABELS[case.layout]["WT"])
    rng = np.random.default_rng([opts.seed, zlib.crc32(case.case_id.encode())])
    keep = P.select_slices(brain, tumour, "all" if split == "val" else opts.slices, rng,
                           opts.background_fraction)
    imgs = slices[np.asarray(keep, int)]
    msks = np.stack([P.apply_inplane(regions[z], plan, is_mask=True) for z in keep]) \
        if len(keep) else np.zeros((0, opts.size, opts.size, len(opts.regions)), np.uint8)
    return {"case_id": case.case_id, "split": split, "images": imgs.astype(np.float32),
            "masks": msks.astype(np.uint8), "slice_index": np.asarray(keep, np.int32),
            "geometry": dict(geom, plan=plan, slices=len(keep))}


def split_by_patient(case_ids: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """case id -> 'train' | 'val'; deterministic by seed, no case in both."""
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = int(math.ceil(val_fraction * len(ids))) if val_fraction > 0 else 0
    if len(ids) >= 2:
        n_val = min(max(n_val, 1 if val_fraction > 0 else 0), len(ids) - 1)
    val = {ids[i] for i in order[:n_val]}
    return {c: ("val" if c in val else "train") for c in ids}


def _iter_results(cases, opts, splits, workers):
    """Yield (case, result | DataError) in case order, at most 2*workers cases in flight."""
    if workers <= 1:
        for c in cases:
            try:
                yield c, process_case(c, opts, splits[c.case_id])
            except DataError as e:
                yield c, e
        return
    import multiprocessing as mp
    from collections import deque
    with mp.get_context("fork").Pool(workers) as pool:
        pending = deque()
        it = iter(cases)
        for c in it:
            pending.append((c, pool.apply_async(_worker, (c, opts, splits[c.case_id]))))
            if len(pending) >= 2 * workers:
                break
        while pending:
            c, fut = pending.popleft()
            yield c, fut.get()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.apply_async(_worker, (nxt, opts, splits[nxt.case_id]))))


def _worker(case, opts, split):
    try:
        return process_case(case, opts, split)
    except DataError as e:
        return e


def convert_to(path: str, cases, opts: Options, splits, *, workers: int, skip_bad: bool, progress: bool):
    """Write all ``cases`` into a new HDF5 file at ``path``;
    returns (slices per split, [(case id, error) of each skipped case])."""
    from tqdm import tqdm
    w = H5Writer(path, opts.size, len(opts.modalities), len(opts.regions))
    counts, skipped = {"train": 0, "val": 0}, []
    try:
        bar = tqdm(total=len(cases), unit="case", disable=not progress, desc="converting")
        for case, r in _iter_results(cases, opts, splits, workers):
            bar.update(1)
            if isinstance(r, DataError):
                if not skip_bad:
                    raise r
                skipped.append((case.case_id, str(r)))
                continue
            w.append(r)
            counts[r["split"]] += len(r["slice_index"])
        bar.close()
    finally:
        w.close({})
    return counts, skipped


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
    p.add_argument("--seed", type=int, default=816, help="seed of the patient split")
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
    return Options(mods, regs, a.size, a.inplane, a.slices, a.background_fraction, a.seed)


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
    out = os.path.abspath(a.output)
    h5_final = out if a.format == "h5" else os.path.join(out, ".unet-convert.h5")
    os.makedirs(os.path.dirname(h5_final) or ".", exist_ok=True)
    tmp = f"{h5_final}.part{rank}-of-{size}.tmp"
    mine = cases[rank::size]
    error = None
    try:
        counts, skipped = convert_to(tmp, mine, opts, splits, workers=a.workers, skip_bad=a.skip_bad,
                                     progress=(rank == 0 and not a.no_progress and sys.stderr.isatty()))
    except DataError as e:
        error, counts, skipped = str(e), {}, []
    error = agree(comm, error)   # the first error any rank found, on every rank: all exit together
    if comm:
        all_skipped = sum(comm.allgather(skipped), [])
        totals = comm.allgather(counts)
    else:
        all_skipped, totals = skipped, [counts]
    parts = [f"{h5_final}.part{r}-of-{size}.tmp" for r in range(size)]
    try:
        if error:
            raise UsageError(error)      # agreed: the same on every rank
        if rank == 0:
            attrs = {"modalities": json.dumps(list(opts.modalities)), "regions": json.dumps(list(opts.regions)),
                     "size": opts.size, "normalisation": P.NORMALISATION,
                     "inplane": opts.inplane, "slices_train": opts.slices, "slices_val": "all",
                     **({"crop_margin": P.CROP_MARGIN} if opts.inplane == "crop_resize" else {}),
                     "layout": layout, "converter_version": CONVERTER_VERSION,
                     "val_fraction": a.val_fraction, "seed": a.seed, "source": os.path.abspath(a.input)}
            staged = f"{h5_final}.tmp-{os.getpid()}"
            if size > 1:
                merge_parts(parts, staged, opts)
            else:
                os.replace(tmp, staged)
            import h5py
            with h5py.File(staged, "a") as f:
                for k, v in attrs.items():
                    f.attrs[k] = v
            os.replace(staged, h5_final)  # only a complete file gets the final name
            n_train = sum(t.get("train", 0) for t in totals)
            n_val = sum(t.get("val", 0) for t in totals)
            bad_ids = {cid for cid, _ in all_skipped}
            n_cases = {s: sum(1 for c in cases if splits[c.case_id] == s and c.case_id not in bad_ids)
                       for s in ("train", "val")}
            if a.format == "npy":
                files = write_npy(h5_final, out)
                os.unlink(h5_final)
                where = ", ".join(os.path.basename(f) for f in files) + f" in {out}"
            else:
                where = out
            print(f"unet-convert: {len(cases) - len(all_skipped)} cases ({layout}) -> {where}: "
                  f"train {n_train} slices from {n_cases['train']} cases, val {n_val} slices from "
                  f"{n_cases['val']} cases, {opts.size}x{opts.size}, channels {','.join(opts.modalities)}, "
                  f"regions {','.join(opts.regions)}")
            if all_skipped:
                print(f"unet-convert: skipped {len(all_skipped)} bad case(s):", file=sys.stderr)
                for _, why in all_skipped:
                    print(f"  {why}", file=sys.stderr)
        return 0
    finally:
        if comm:
            comm.Barrier()  # rank 0 has finished reading every part
        try:  # each rank removes only its own part: no two ranks race on one file
            os.unlink(tmp)
        except FileNotFoundError:
            pass


if __name__ == "__main__":
    sys.exit(main())
