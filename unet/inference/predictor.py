"""The predictor: a trained network behind one inference engine, from raw case intensities to region
masks and label maps on the case's own grid.

The preprocessing (modalities and their order, z-score over brain voxels, in-plane size and
crop/resize) is read from the model folder's ``model.json`` (``unet.modelfolder``), written at training
time from the data file's metadata; nothing is re-typed. Every axial slice with a head voxel is predicted
(with TTA, mirrored too; the others are background by the head mask), the in-plane step undone, and the
probabilities post-processed (``unet.inference.postprocess``). The network runs in one of the inference engines
(``unet.inference.engines``); all the rest is the same for each.
"""
from __future__ import annotations

import os

import numpy as np

from unet.data import labels as L
from unet.data import preprocess as P
from unet.data.layouts import Case
from unet.data.nifti import Options, read_case
from unet.inference import engines as E
from unet.inference.postprocess import PostOptions, postprocess, tta_flips
from unet.modelfolder import META, ModelError, locate, read_meta

FILE_ENGINE = {".keras": "tensorflow", ".xml": "openvino", ".onnx": "onnxruntime"}


def preprocessing_of(attrs: dict, meta_path: str) -> tuple[str, str, int]:
    """(normalisation, in-plane mode, crop margin) the training file was made with, from model.json's
    ``data.attrs``: never a default, a ModelError naming the file when one is missing or unknown."""
    for key, known in (("normalisation", (P.NORMALISATION,)), ("inplane", P.INPLANE_MODES)):
        if key not in attrs:
            raise ModelError(f"{meta_path}: data.attrs.{key} missing (the training data's preprocessing "
                             f"is unknown; unet-predict needs a model trained on a unet-convert HDF5 file)")
        if attrs[key] not in known:
            raise ModelError(f"{meta_path}: data.attrs.{key} {attrs[key]!r} is not implemented "
                             f"(known: {', '.join(map(repr, known))})")
    margin = P.CROP_MARGIN
    if attrs["inplane"] == "crop_resize":   # the head box's margin, as the file was converted
        margin = attrs.get("crop_margin")
        if not isinstance(margin, int) or isinstance(margin, bool) or margin < 0:
            raise ModelError(f"{meta_path}: data.attrs.crop_margin {margin!r}: crop_resize needs the head "
                             f"box's margin in voxels, an integer >= 0 (unet-convert records it)")
    return attrs["normalisation"], attrs["inplane"], margin


class Predictor:
    """A trained network behind one inference engine (``unet.inference.engines``), with the preprocessing its
    model.json records and the same pre- and post-processing whatever the engine."""

    def __init__(self, model_path: str, batch_size: int = 16, engine: str | None = None, threads: int = 0,
                 int8: bool = False):
        folder, named_file = locate(model_path)
        meta_path = os.path.join(folder, META)
        # a file names its engine (model.xml -> openvino, ...) unless --engine says otherwise
        named = FILE_ENGINE.get(os.path.splitext(named_file)[1]) if named_file else None
        self.meta = read_meta(folder)
        d = self.meta["data"]
        self.modalities = tuple(d["modalities"])
        self.regions = tuple(d["region_names"])
        self.size = int(d["height"])
        self.normalisation, self.inplane, self.crop_margin = preprocessing_of(d.get("attrs") or {}, meta_path)
        # --model naming the int8 IR itself is --int8
        int8 = int8 or (named == "openvino" and os.path.abspath(model_path) ==
                        os.path.abspath(E.model_file("openvino", folder, self.meta, int8=True)))
        # the int8 IR (the folder's, whatever file --model names) only when asked for: it runs on OpenVINO
        self.engine = engine or ("openvino" if int8 else named or E.default_engine(folder, self.meta))
        # what is missing is said now, before any case is read
        given = model_path if named == self.engine and not int8 else None
        self.model_path = E.check(self.engine, folder, self.meta, given, int8=int8)
        self.int8 = int8
        self.folder, self.batch_size, self.threads, self._model = folder, batch_size, threads, None

    @property
    def model(self):
        """The engine instance: called on a batch of slices, returns their probabilities."""
        if self._model is None:
            from unet.distributed.ranks import inference_threads
            self._model = E.CLASSES[self.engine](self.model_path, self.threads or inference_threads())
        return self._model

    def network_input(self, chans: np.ndarray) -> P.NetworkInput:
        """(C,z,y,x) raw intensities -> what the model sees: the training file's preprocessing."""
        return P.network_input(chans, self.size, self.inplane, self.normalisation, self.crop_margin)

    def _forward(self, slices: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(self.model(slices[i:i + self.batch_size], training=False))
                               for i in range(0, len(slices), self.batch_size)])

    def network_output(self, slices: np.ndarray, tta=False) -> np.ndarray:
        """(z, size, size, C) input slices -> (z, size, size, R) probabilities; with ``tta`` (a --tta value:
        True or "all", "lr") the mean over the slices and their mirror images, each flipped back."""
        if not tta:
            return self._forward(slices)
        flips = tta_flips(tta)
        total = np.zeros(slices.shape[:3] + (len(self.regions),), np.float32)
        for axes in flips:
            x = np.flip(slices, axes) if axes else slices
            out = self._forward(np.ascontiguousarray(x))
            total += np.flip(out, axes) if axes else out
        return total / len(flips)

    def probabilities(self, chans: np.ndarray, tta=False,
                      head_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(C,z,y,x) raw intensities -> ((z,y,x,R) probabilities on the input grid, (z,y,x) head mask).
        ``head_only``: the network runs only on the slices with a head voxel, the others get probability 0
        (what the head mask of the post-processing makes of any answer there)."""
        inp = self.network_input(chans)
        return P.to_case_grid(self.input_output(inp, tta, head_only)[0], inp), inp.brain

    def input_output(self, inp: P.NetworkInput, tta=False, head_only: bool = False) -> tuple[np.ndarray, int]:
        """(the (z, size, size, R) probabilities of ``inp``'s slices on the network's grid, how many slices went
        through the network); ``head_only``: only the slices with a head voxel, the others get 0."""
        if not head_only:
            return self.network_output(inp.slices, tta), len(inp.slices)
        keep = head_slices(inp.brain)
        out = np.zeros(inp.slices.shape[:3] + (len(self.regions),), np.float32)
        if keep.any():
            out[keep] = self.network_output(inp.slices[keep], tta)
        return out, int(keep.sum())

    def regions_mask(self, chans: np.ndarray, spacing, post: PostOptions = PostOptions()) -> np.ndarray:
        """(C,z,y,x) raw intensities -> (z,y,x,R) nested uint8 region masks after post-processing;
        ``spacing`` is the voxel size (mm) along (z, y, x). With the head mask on, slices without a head
        voxel are not run through the network (their masks are empty either way)."""
        probs, brain = self.probabilities(chans, post.tta, head_only=post.head_mask)
        return postprocess(probs, brain, self.regions, spacing, post)

    def label_map(self, masks: np.ndarray, labels: str) -> np.ndarray:
        if self.regions == L.REGIONS:
            return L.labels_from_regions(masks, labels)
        return masks[..., 0].astype(np.uint8)   # single-region model: 1 = that region

    def read(self, case: Case):
        opts = Options(self.modalities, L.REGIONS, self.size, self.inplane, "all", 0.0, 0)
        return read_case(case, opts, need_seg=False)


def head_slices(brain: np.ndarray) -> np.ndarray:
    """(z,y,x) head mask -> (z,) the axial slices holding at least one head voxel."""
    return brain.reshape(brain.shape[0], -1).any(axis=1)


def reference_image(case: Case):
    """A 3-D SimpleITK image carrying the case's geometry (for writing predictions)."""
    import SimpleITK as sitk
    path = case.files.get("image") or next(iter(case.files.values()))
    img = sitk.ReadImage(path)
    if img.GetDimension() == 4:
        size = list(img.GetSize())
        img = sitk.Extract(img, size[:3] + [0], [0, 0, 0, 0])
    return img


def write_labels(labels: np.ndarray, ref, path: str) -> None:
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(labels.astype(np.uint8))
    img.CopyInformation(ref)
    tmp = path + ".tmp.nii.gz"
    sitk.WriteImage(img, tmp, True)
    os.replace(tmp, path)
