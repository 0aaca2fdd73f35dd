"""Several trained models on one converted file: out-of-fold scoring and ensembles.

Out-of-fold: ``unet-convert --folds K`` records each training case's fold in the file, and a model
trained with ``train_hvd.py --fold k`` records ``data.fold`` = k and ``data.folds`` = K in its
model.json. Each case of fold k is scored by the model of fold k, the one model that never trained
on it (``out_of_fold``): over K models every training case is scored once, as BraTS papers and
nnU-Net report 5-fold cross-validation.

Ensemble (``Ensemble``): the mean of the models' probabilities on the case grid, each model run by
its own inference engine with its own preprocessing, then the post-processing of one model
(``unet.inference.postprocess``), unchanged.
"""
from __future__ import annotations

import os

import numpy as np

from unet.data.layouts import find_cases
from unet.data.sources import file_cases, find_file_cases, validation_cases
from unet.errors import UsageError
from unet.inference.postprocess import PostOptions, postprocess


class EvalError(UsageError):
    """Bad input to unet-evaluate: one line naming the flag or file."""


def model_fold(meta: dict) -> tuple[int, int | None]:
    """(folds of the training file, fold held out) from a model.json; (0, None) without folds."""
    d = meta.get("data") or {}
    fold = d.get("fold")
    return int(d.get("folds") or 0), (None if fold is None else int(fold))


def out_of_fold(models: list[tuple[str, dict]], k_file: int, case_folds: dict[str, int], data: str) -> dict[str, int]:
    """Case id -> index into ``models`` ((name, model.json) pairs) of the model whose held-out fold
    holds the case, for every case of the folds these models hold out. ``k_file``, ``case_folds``:
    the file's folds and each training case's fold."""
    if not k_file:
        raise EvalError(f"--data {data}: the file has no folds (unet-convert --folds K writes them), so no "
                        f"case has an out-of-fold model; --ensemble scores its validation cases with all models")
    by_fold: dict[int, int] = {}
    for i, (name, meta) in enumerate(models):
        k, fold = model_fold(meta)
        if fold is None:
            raise EvalError(f"--model {name}: its model.json records no fold (trained without --fold): out-of-fold "
                            f"scoring needs models trained with --fold; --ensemble averages any models")
        if k != k_file:
            raise EvalError(f"--model {name}: trained on fold {fold} of a file with {k} folds, but --data {data} "
                            f"has {k_file}")
        if fold in by_fold:
            raise EvalError(f"--model {name} and --model {models[by_fold[fold]][0]} both hold out fold {fold}")
        by_fold[fold] = i
    return {case: by_fold[f] for case, f in sorted(case_folds.items()) if f in by_fold}


class Ensemble:
    """Predictors (``unet.inference.predict.Predictor``) of the same channels and regions, as one."""

    def __init__(self, predictors: list, names: list[str]):
        first = predictors[0]
        for p, name in zip(predictors[1:], names[1:]):
            if (p.modalities, p.regions) != (first.modalities, first.regions):
                raise EvalError(f"--model {name}: takes {','.join(p.modalities)} -> {','.join(p.regions)}, "
                                f"--model {names[0]} {','.join(first.modalities)} -> {','.join(first.regions)}: "
                                f"an ensemble needs the same channels and regions")
        self.predictors, self.regions, self.modalities = predictors, first.regions, first.modalities

    def read(self, case):
        return self.predictors[0].read(case)

    def probabilities(self, chans: np.ndarray, tta=False,
                      head_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(C,z,y,x) raw intensities -> (mean over the models of their (z,y,x,R) probabilities, head mask);
        ``head_only`` as for one model (``Predictor.probabilities``)."""
        total, brain = None, None
        for p in self.predictors:
            probs, brain = p.probabilities(chans, tta, head_only)
            total = probs.astype(np.float32) if total is None else total + probs
        return total / np.float32(len(self.predictors)), brain

    def regions_mask(self, chans: np.ndarray, spacing, post: PostOptions = PostOptions()) -> np.ndarray:
        probs, brain = self.probabilities(chans, post.tta, head_only=post.head_mask)
        return postprocess(probs, brain, self.regions, spacing, post)

    def label_map(self, masks: np.ndarray, labels: str) -> np.ndarray:
        return self.predictors[0].label_map(masks, labels)


def _dataset_cases(root: str) -> list:
    if not os.path.isdir(root):
        raise EvalError(f"--cases {root}: not a folder")
    cases = [c for c in find_cases(root) if c.seg]
    if not cases:
        raise EvalError(f"--cases {root}: no case with a segmentation to score against")
    return cases


def plan(a, preds: list) -> list[tuple]:
    """(case, predictor or ensemble that scores it, its fold or None) for every case to score; ``a``:
    unet-evaluate's options (``evaluate.EvalOptions``: model, data, ensemble, cases), ``preds``: one Predictor
    per --model."""
    if a.cases or a.ensemble or (len(preds) == 1 and model_fold(preds[0].meta)[1] is None):
        if len(preds) > 1 and not a.ensemble:
            raise EvalError("--cases with several --model: give --ensemble (out-of-fold scoring takes its cases "
                            "and their folds from --data)")
        runner = Ensemble(preds, a.model) if len(preds) > 1 else preds[0]
        cases = _dataset_cases(a.cases) if a.cases else validation_cases(a.data)
        if not cases:
            raise EvalError(f"--data {a.data}: no validation cases (every case is in a fold): score out of fold "
                            f"without --ensemble, or give --cases")
        return [(c, runner, None) for c in cases]
    _, k, folds = file_cases(a.data)
    which = out_of_fold([(m, p.meta) for m, p in zip(a.model, preds)], k, folds, a.data)
    cases = find_file_cases(a.data, which, "training")
    return [(c, preds[which[c.case_id]], folds[c.case_id]) for c in cases]
