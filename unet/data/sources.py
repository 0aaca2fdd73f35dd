"""Where training slices come from, behind one small interface.

A source has ``len(source)``, ``source.shape`` = (H, W, C, R),
``source.read(indices) -> (images float32 (B,H,W,C), masks float32 (B,H,W,R))`` and
``source.tumour_slices()``: the sorted indices of the slices whose masks hold any region
(found once, by reading the masks only, when ``--foreground_fraction`` asks for them).
Reads are random access and streamed: nothing holds the dataset in memory.

* ``H5Source``: the HDF5 file of ``unet-convert`` (groups ``train``/``val`` with
  ``images`` (N,H,W,C) and ``masks`` (N,H,W,R); root attributes name the
  modalities, regions, size and preprocessing).
* ``NpySource``: the seed's ``imgs_train.npy``/``msks_train.npy``/``imgs_test.npy``/
  ``msks_test.npy`` (memory-mapped). ``unet-convert --format npy`` adds
  ``unet-convert.json`` naming the channels and regions; without it the folder must
  be the seed's own (1 channel, FLAIR; 1 region, WT).
* Folds (``unet-convert --folds K``, ``--fold k``): training reads the ``train`` rows of the
  other folds' cases, validation every slice of fold k's cases (their ``train`` and ``rest``
  rows), both as views (``H5Source`` with ``rows``) of the one file.
* ``SyntheticSource``: bright ellipses over noise, generated per index from the
  seed, so any size costs no memory; the masks are nested (region r+1 inside
  region r), like WT > TC > ET.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from unet.data.layouts import NPY_FILES, NPY_SIDECAR, find_cases
from unet.data.pipeline import epoch_length
from unet.errors import UsageError

# Where the trainer looks when given neither --data nor --synthetic (relative to the
# working directory): `unet-convert --output data/brats.h5` writes it, and the demo
# links its converted synthetic cases there when nothing is.
DEFAULT_DATA = "data/brats.h5"

H5_MAGIC = b"\x89HDF\r\n\x1a\n"            # the first 8 bytes of every HDF5 file

SEED_NPY = {"modalities": ["FLAIR"], "regions": ["WT"], "layout": "seed-npy"}  # the seed's own four files


def _tumour_slices(source, masks_of) -> np.ndarray:
    """Indices of the slices with any mask voxel set, cached on ``source``; ``masks_of(start, stop)``
    returns the masks of slices start..stop-1, read 256 at a time."""
    if getattr(source, "_tumour", None) is None:
        n = len(source)
        source._tumour = np.concatenate(
            [s + np.flatnonzero(np.asarray(masks_of(s, min(s + 256, n))).reshape(min(256, n - s), -1).any(1))
             for s in range(0, n, 256)] or [np.zeros(0, np.int64)]).astype(np.int64)
    return source._tumour


@dataclass(frozen=True)
class DataOptions:
    """What the trainer's flags ask of the data (``from_flags``): a file or folder, or in-memory synthetic images."""
    data: str | None = None
    fold: int | None = None              # --fold: validate on this fold of a unet-convert --folds file
    foreground_fraction: float = 0.0     # > 0: the training split must hold a slice with tumour
    background_fraction: float = 1.0     # < 1: each epoch the tumour slices and this share of the others
    synthetic: bool = False
    synthetic_size: int = 128
    synthetic_channels: int = 1
    synthetic_regions: int = 1
    synthetic_train: int = 512
    synthetic_val: int = 64
    seed: int = 0                        # of the synthetic images

    @classmethod
    def from_flags(cls, args) -> "DataOptions":
        """From parsed flags: every field from the flag of its name (as ``EvalOptions.from_flags``: a flag
        missing from the parser is an AttributeError here, not a silent default)."""
        return cls(**{k: getattr(args, k) for k in cls.__dataclass_fields__})


@dataclass
class DataInfo:
    """What the model and the exported metadata need to know about the data."""
    height: int
    width: int
    channels: int
    regions: int
    modalities: list[str] = field(default_factory=list)
    region_names: list[str] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)
    folds: int = 0                 # the file's folds (0: none)
    fold: int | None = None        # the fold held out for validation (--fold)

    def to_json(self) -> dict:
        out = {"height": self.height, "width": self.width, "channels": self.channels,
               "regions": self.regions, "modalities": self.modalities,
               "region_names": self.region_names, "attrs": self.attrs}
        if self.folds:
            out.update(folds=self.folds, fold=self.fold)
        return out


class SyntheticSource:
    def __init__(self, n: int, size: int, channels: int, regions: int, seed: int, split: str):
        self.n, self.size, self.channels, self.regions = n, size, channels, regions
        self.seed, self.split_id = seed, {"train": 0, "val": 1}[split]
        self.shape = (size, size, channels, regions)

    def __len__(self) -> int:
        return self.n

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split_id, int(i)])
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        cy, cx = rng.uniform(0.3 * s, 0.7 * s, 2)
        ry, rx = rng.uniform(0.08 * s, 0.25 * s, 2)
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
        r2 = u * u + v * v
        mask = np.stack([(r2 <= (1.0 - 0.3 * k) ** 2) for k in range(self.regions)], -1)
        img = rng.normal(0.0, 0.5, (s, s, self.channels)).astype(np.float32)
        gain = rng.uniform(1.0, 2.0, self.channels).astype(np.float32)
        img += gain * mask[..., :1].astype(np.float32)
        if self.regions > 1:
            img += 0.5 * gain * mask[..., 1:2].astype(np.float32)
        return img.astype(np.float32), mask.astype(np.float32)

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self.sample(i) for i in indices]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def tumour_slices(self) -> np.ndarray:
        return _tumour_slices(self, lambda a, b: self.read(range(a, b))[1])


class _ArraySource:
    """images (N,H,W,C) and masks (N,H,W,R) array-likes (h5py datasets or memory maps)."""

    def __init__(self, images, masks, name: str):
        if len(images.shape) != 4 or len(masks.shape) != 4:
            raise UsageError(f"--data {name}: images/masks must be 4-D (N,H,W,C)/(N,H,W,R), "
                             f"got {tuple(images.shape)} and {tuple(masks.shape)}")
        self.images, self.masks = images, masks
        n, h, w, c = images.shape
        self.shape = (h, w, c, masks.shape[-1])

    def __len__(self) -> int:
        return self.images.shape[0]

    def tumour_slices(self) -> np.ndarray:
        return _tumour_slices(self, lambda a, b: self.masks[a:b])


class H5Source(_ArraySource):
    """A group of the HDF5 file; with ``rows``, only those rows of it (in that order)."""

    def __init__(self, path: str, split: str, rows=None):
        import h5py
        self.f = h5py.File(path, "r")
        super().__init__(self.f[split]["images"], self.f[split]["masks"], path)
        self.rows = None if rows is None else np.asarray(rows, np.int64)

    def __len__(self) -> int:
        return super().__len__() if self.rows is None else len(self.rows)

    def tumour_slices(self) -> np.ndarray:
        if self.rows is None:
            return super().tumour_slices()
        return _tumour_slices(self, lambda a, b: self.read(range(a, b))[1])   # positions among ``rows``

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        # One chunk-aligned read per slice: h5py's point selection over a list of
        # indices is ~18x slower for a batch of 8 (94 ms against 5 ms here).
        idx = [int(i) for i in (indices if self.rows is None else self.rows[np.asarray(indices, np.int64)])]
        h, w, c, r = self.shape
        imgs = np.empty((len(idx), h, w, c), np.float32)
        msks = np.empty((len(idx), h, w, r), np.float32)
        for k, i in enumerate(idx):
            imgs[k] = self.images[i]
            msks[k] = self.masks[i]
        return imgs, msks


class ConcatSource:
    """Sources of one shape read as one: index i of the second follows the last of the first."""

    def __init__(self, parts):
        self.parts = [p for p in parts if len(p)] or list(parts[:1])
        self.shape = parts[0].shape
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def tumour_slices(self) -> np.ndarray:
        return np.concatenate([start + p.tumour_slices() for start, p in zip(self.starts, self.parts)]
                              or [np.zeros(0, np.int64)]).astype(np.int64)

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, np.int64)
        part = np.searchsorted(self.starts, idx, side="right") - 1
        h, w, c, r = self.shape
        imgs, msks = np.empty((len(idx), h, w, c), np.float32), np.empty((len(idx), h, w, r), np.float32)
        for k in np.unique(part):
            sel = np.flatnonzero(part == k)
            imgs[sel], msks[sel] = self.parts[k].read(idx[sel] - self.starts[k])
        return imgs, msks


class NpySource(_ArraySource):
    def __init__(self, folder: str, split: str):
        img_name, msk_name = NPY_FILES[split]
        super().__init__(np.load(os.path.join(folder, img_name), mmap_mode="r", allow_pickle=False),
                         np.load(os.path.join(folder, msk_name), mmap_mode="r", allow_pickle=False), folder)

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices)
        return self.images[idx].astype(np.float32), self.masks[idx].astype(np.float32)


def npy_metadata(folder: str) -> dict:
    """What an npy folder holds: unet-convert.json, checked against the files' shapes; without
    it, the seed's FLAIR -> WT, accepted only for 1-channel images and 1-region masks."""
    shapes = {}
    for names in NPY_FILES.values():
        for name in names:
            shapes[name] = list(np.load(os.path.join(folder, name), mmap_mode="r", allow_pickle=False).shape)
    path = os.path.join(folder, NPY_SIDECAR)
    if not os.path.exists(path):
        c, r = shapes[NPY_FILES["train"][0]][-1], shapes[NPY_FILES["train"][1]][-1]
        if (c, r) != (1, 1):
            raise UsageError(f"--data {folder}: images have {c} channel(s) and masks {r} region(s) but there is "
                             f"no {NPY_SIDECAR} naming them (the seed's npy files are FLAIR -> WT, 1 and 1)")
        return dict(SEED_NPY, source="npy")
    try:
        with open(path) as fh:
            meta = json.load(fh)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise UsageError(f"--data {folder}: {NPY_SIDECAR}: cannot read ({str(e).splitlines()[0]})") from None
    if not meta.get("complete"):
        raise UsageError(f"--data {folder}: an unet-convert run into this folder did not finish "
                         f"({NPY_SIDECAR} marks it incomplete); convert again")
    for name, shape in shapes.items():
        if meta.get("shapes", {}).get(name) != shape:
            raise UsageError(f"--data {folder}: {name} has shape {tuple(shape)}, {NPY_SIDECAR} says "
                             f"{tuple(meta.get('shapes', {}).get(name) or ())}: files from different conversions")
    return {k: v for k, v in meta.items() if k not in ("complete", "shapes")}


def _attr_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (bytes, str)):
        s = value.decode() if isinstance(value, bytes) else value
        try:
            v = json.loads(s)
            return [str(x) for x in v] if isinstance(v, list) else [s]
        except ValueError:
            return [x for x in s.split(",") if x]
    return [x.decode() if isinstance(x, bytes) else str(x) for x in value]


def decoded(attrs) -> dict:
    """HDF5 attributes as plain values: str for bytes, lists for arrays."""
    return {k: (v.decode() if isinstance(v, bytes) else v.tolist() if hasattr(v, "tolist") else v)
            for k, v in attrs.items()}


@dataclass(frozen=True)
class H5Contents:
    """What ``check_h5`` found in a unet-convert HDF5 file."""
    attrs: dict          # root attributes, decoded (str, list, number)
    images: dict         # split -> shape (N, H, W, C) of its images
    masks: dict          # split -> shape (N, H, W, R) of its masks


def check_h5(path: str, named: str | None = None, *, converted: bool = False) -> H5Contents:
    """The one check of a unet-convert HDF5 file, whoever reads it (the trainer's --data, unet-evaluate's,
    int8's): it exists, is HDF5, and holds groups ``train`` and ``val`` with ``images`` and ``masks``; with
    ``converted`` it also names the folder and layout it was converted from and the case of every
    validation slice (what finding the validation cases again needs). A UsageError ``<named>: ...``
    (``named`` by default ``--data PATH``) otherwise; what was found, when it holds."""
    import h5py
    named = named or f"--data {path}"
    if not os.path.exists(path):
        raise UsageError(f"{named}: no such file")
    if not os.path.isfile(path):
        raise UsageError(f"{named}: not an HDF5 file")
    with open(path, "rb") as fh:
        if fh.read(8) != H5_MAGIC:
            raise UsageError(f"{named}: not an HDF5 file")
    try:
        with h5py.File(path, "r") as f:
            for split in ("train", "val"):
                if split not in f or "images" not in f[split] or "masks" not in f[split]:
                    raise UsageError(f"{named}: missing group '{split}' with 'images' and 'masks'")
            for key in ("source", "layout") if converted else ():
                if key not in f.attrs:
                    raise UsageError(f"{named}: not written by unet-convert (no {key!r})")
            if converted and "case_id" not in f["val"]:
                raise UsageError(f"{named}: not written by unet-convert (no 'case_id')")
            return H5Contents(decoded(f.attrs), {s: tuple(f[s]["images"].shape) for s in ("train", "val")},
                              {s: tuple(f[s]["masks"].shape) for s in ("train", "val")})
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{named}: cannot read ({str(e).splitlines()[0]})") from None


def check_data(path: str) -> None:
    """--data as the trainer takes it, checked on every rank before any heavy work: a unet-convert HDF5
    file (``check_h5``) or a folder of the seed's npy files."""
    if not os.path.exists(path):
        hint = (" (the default --data: convert BraTS with `unet-convert --input DIR --output "
                f"{DEFAULT_DATA}`, run scripts/demo.sh, or pass --synthetic)") if path == DEFAULT_DATA else ""
        raise UsageError(f"--data {path}: no such file or folder{hint}")
    if os.path.isdir(path):
        for split, names in NPY_FILES.items():
            for name in names:
                if not os.path.isfile(os.path.join(path, name)):
                    raise UsageError(f"--data {path}: folder lacks {name} (the seed's npy layout)")
        return
    check_h5(path)


def _check_pair(path: str, split: str, src) -> None:
    ni, h, w, c = (src.images.shape[0],) + tuple(src.shape[:3])
    nm = src.masks.shape[0]
    if src.masks.ndim != 4 or src.images.ndim != 4:
        raise UsageError(f"--data {path}: {split} images/masks must be 4-D (N,H,W,C)/(N,H,W,R)")
    if nm != ni or tuple(src.masks.shape[1:3]) != (h, w):
        raise UsageError(f"--data {path}: {split} images {tuple(src.images.shape)} and masks "
                         f"{tuple(src.masks.shape)} do not match")


SHARE_SLICES = 2048   # foreground_share reads at most this many training slices, evenly strided


def foreground_share(source, max_slices: int = SHARE_SLICES, chunk: int = 64) -> list[float]:
    """Each region's share of foreground pixels over the training slices (all of them, or ``max_slices``
    evenly strided ones): the prior that ``--head_bias prior`` starts the network's output at."""
    n = len(source)
    h, w, _, r = source.shape
    idx = np.unique(np.linspace(0, n - 1, min(n, max_slices)).round().astype(np.int64))
    total = np.zeros(r, np.float64)
    for s in range(0, len(idx), chunk):
        _, msks = source.read(idx[s:s + chunk])
        total += msks.sum(axis=(0, 1, 2), dtype=np.float64)
    return (total / (len(idx) * h * w)).tolist()


def file_folds(f) -> tuple[int, dict[str, int]]:
    """(K, training case id -> fold) of an open unet-convert HDF5 file; (0, {}) for a file without folds."""
    k = int(f.attrs.get("folds", 0))
    if not k:
        return 0, {}
    out = {}
    for case, raw in f["cases"].attrs.items():
        d = json.loads(raw)
        if d.get("fold") is not None:
            out[case] = int(d["fold"])
    return k, out


def fold_rows(f, path: str, fold: int) -> tuple[int, np.ndarray, dict[str, np.ndarray]]:
    """``--fold``: (K, rows of ``train`` to train on, {group: rows of fold ``fold``'s cases} to validate on)."""
    k, folds = file_folds(f)
    if not k:
        raise UsageError(f"--fold {fold}: {path} has no folds (convert it with unet-convert --folds K)")
    if not 0 <= fold < k:
        raise UsageError(f"--fold {fold}: {path} has {k} folds, so --fold must be in 0..{k - 1}")
    if "rest" not in f:
        raise UsageError(f"--data {path}: has {k} folds but no group 'rest' (not written by unet-convert --folds)")
    of = {g: np.array([folds.get(c, -1) for c in f[g]["case_id"].asstr()[:]], np.int64) for g in ("train", "rest")}
    return k, np.flatnonzero(of["train"] != fold), {g: np.flatnonzero(v == fold) for g, v in of.items()}


def open_sources(args: DataOptions) -> tuple[object, object | None, DataInfo]:
    """(train source, validation source or None, DataInfo) for these options."""
    if args.synthetic:
        s, c, r = args.synthetic_size, args.synthetic_channels, args.synthetic_regions
        train = SyntheticSource(args.synthetic_train, s, c, r, args.seed, "train")
        val = SyntheticSource(args.synthetic_val, s, c, r, args.seed, "val") if args.synthetic_val else None
        info = DataInfo(s, s, c, r, [f"synthetic{i}" for i in range(c)],
                        ["WT", "TC", "ET"][:r] if r <= 3 else [f"region{i}" for i in range(r)],
                        {"source": "synthetic"})
        return train, val, info
    path, fold = args.data, args.fold
    check_data(path)
    attrs: dict = {}
    k, rows = 0, None
    try:
        if os.path.isdir(path):
            if fold is not None:
                raise UsageError(f"--fold {fold}: {path} is a folder of npy files, which have no folds "
                                 f"(unet-convert --folds K writes an HDF5 file)")
            attrs = npy_metadata(path)   # the folder's, checked once for both splits
            train, val = NpySource(path, "train"), NpySource(path, "val")
            modalities, regions = _attr_list(attrs.get("modalities")), _attr_list(attrs.get("regions"))
        else:
            import h5py
            with h5py.File(path, "r") as f:
                attrs = decoded(f.attrs)
                modalities = _attr_list(f.attrs.get("modalities"))
                regions = _attr_list(f.attrs.get("regions"))
                k = file_folds(f)[0]
                if fold is not None:
                    k, train_rows, rows = fold_rows(f, path, fold)
            train, val = H5Source(path, "train"), H5Source(path, "val")
    except UsageError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--data {path}: cannot read ({str(e).splitlines()[0]})") from None
    for split, src in (("train", train), ("val", val)):
        _check_pair(path, split, src)
    if rows is not None:   # --fold: views of the file, checked above as a whole
        held_out = [H5Source(path, "train", rows["train"]), H5Source(path, "rest", rows["rest"])]
        _check_pair(path, "rest", held_out[1])
        train, val = H5Source(path, "train", train_rows), ConcatSource(held_out)
    if len(train) == 0:
        raise UsageError(f"--data {path}: the train split is empty")
    if train.shape != val.shape and len(val):
        raise UsageError(f"--data {path}: train {train.shape} and val {val.shape} shapes differ")
    h, w, c, r = train.shape
    if h % 16 or w % 16:
        raise UsageError(f"--data {path}: image size {h}x{w} is not a multiple of 16 (4 poolings)")
    if modalities and len(modalities) != c:
        raise UsageError(f"--data {path}: attribute 'modalities' names {len(modalities)} channels, images have {c}")
    if regions and len(regions) != r:
        raise UsageError(f"--data {path}: attribute 'regions' names {len(regions)} regions, masks have {r}")
    info = DataInfo(h, w, c, r, modalities or [f"channel{i}" for i in range(c)],
                    regions or [f"region{i}" for i in range(r)], attrs, folds=k, fold=fold)
    if args.foreground_fraction and not len(train.tumour_slices()):
        raise UsageError(f"--foreground_fraction {args.foreground_fraction}: no training slice of {path} "
                         f"holds tumour (every mask is empty)")
    if args.background_fraction < 1 and not epoch_length(len(train), len(train.tumour_slices()),
                                                          args.background_fraction):
        raise UsageError(f"--background_fraction {args.background_fraction}: an epoch of {path} would be empty "
                         f"(no training slice holds tumour)")
    return train, (val if len(val) else None), info


def file_cases(data: str) -> tuple[list[str], int, dict[str, int]]:
    """(validation case ids, folds, training case id -> fold) of a unet-convert HDF5 file."""
    return _file_index(data)[2:]


def _file_index(data: str) -> tuple[str, str, list[str], int, dict[str, int]]:
    import h5py
    attrs = check_h5(data, converted=True).attrs
    with h5py.File(data, "r") as f:
        val_ids = sorted(set(f["val"]["case_id"].asstr()[:]))
        k, folds = file_folds(f)
    return str(attrs["source"]), str(attrs["layout"]), val_ids, k, folds


def find_file_cases(data: str, ids, what: str = "validation") -> list:
    """The cases ``ids`` of a unet-convert HDF5 file, found again in its source folder (in id order)."""
    source, layout = _file_index(data)[:2]
    cases = [c for c in find_cases(source, layout) if c.case_id in set(ids)]
    missing = sorted(set(ids) - {c.case_id for c in cases})
    if missing:
        raise UsageError(f"--data {data}: {what} case(s) {', '.join(missing)} not found in {source}")
    return sorted(cases, key=lambda c: c.case_id)


def validation_cases(data: str) -> list:
    """The validation cases of a unet-convert HDF5 file, found again in its source folder."""
    return find_file_cases(data, file_cases(data)[0], "validation")
