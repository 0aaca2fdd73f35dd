"""Lesion-wise BraTS metrics, computed by panoptica as the official ``brats-evaluation`` does.

Per region, panoptica splits prediction and reference into 3-D connected components (26-
connectivity, cc3d), matches them one to one (maximum bipartite matching on Dice, any overlap
counts: threshold 1e-6), and reports

* detection: TP (matched lesions), FP (predicted lesions left unmatched), FN (reference lesions
  left unmatched), precision, recall, F1 = TP / (TP + (FP + FN) / 2);
* lesion-wise Dice, NSD and HD95: mean (and std) over the matched pairs;
* global Dice, NSD and HD95 of the whole region.

The evaluator below carries the settings of brats-evaluation's ``gli`` configuration (matcher,
metrics, empty-case rules; a test checks it against that file); its label groups are those of
each label convention (``unet.data.labels``): WT, TC, ET and the BraTS 2023 sub-regions NETC and
SNFH. Columns carry the names ``brats-parse-metrics seg`` writes, a global HD95 of infinity
becomes 373 as there, so the two CSVs can be set side by side.

Empty cases, as the official tool has them: a region absent from both -> NaN (left out of
means); absent from one -> Dice 0, HD95 373 (global) or inf (lesion-wise), F1 0.
"""
from __future__ import annotations

import contextlib
import functools
import io
import warnings

import numpy as np

from unet.data import labels as L

REGIONS = L.REGIONS + L.SUBREGIONS
# brats-parse-metrics seg's column names (before "_<region>") and the PanopticaResult field of each
FIELDS = {
    "all_instance_tp": "tp", "all_instance_fp": "fp", "all_instance_fn": "fn",
    "all_instance_prec": "prec", "all_instance_rec": "rec", "all_instance_f1": "rq",
    "global_dsc": "global_bin_dsc", "global_nsd": "global_bin_nsd", "global_hd95": "global_bin_hd95",
    "lesionwise_dsc_mean": "sq_dsc", "lesionwise_dsc_std": "sq_dsc_std",
    "lesionwise_nsd_mean": "sq_nsd", "lesionwise_nsd_std": "sq_nsd_std",
    "lesionwise_hd95_mean": "sq_hd95", "lesionwise_hd95_std": "sq_hd95_std",
}
# the rows of the summary table
SUMMARY = ("lesionwise_dsc_mean", "lesionwise_hd95_mean", "global_dsc", "global_hd95", "global_nsd",
           "all_instance_tp", "all_instance_fp", "all_instance_fn", "all_instance_f1")
# brats-parse-metrics' penalty for an infinite global HD95 (it calls it the diameter of SRI space)
MAX_HD95 = 373.0


def column(metric: str, region: str) -> str:
    return f"{metric}_{region.lower()}"


def columns(regions=REGIONS) -> list[str]:
    return [column(m, r) for r in regions for m in FIELDS]


def label_groups(layout: str) -> dict[str, tuple[int, ...]]:
    """Region -> labels of a convention: WT, TC, ET merged from their labels, NETC and SNFH one each."""
    return {**L.REGION_LABELS[layout], **L.SUBREGION_LABELS[layout]}


@functools.lru_cache(maxsize=None)
def evaluator(layout: str):
    """A panoptica evaluator with the official ``gli`` settings and the label groups of ``layout``."""
    from panoptica import (
        ConnectedComponentsInstanceApproximator,
        InputType,
        MaxBipartiteMatching,
        Metric,
        Panoptica_Evaluator,
    )
    from panoptica.utils.citation_reminder import disable_citation_reminder
    from panoptica.utils.edge_case_handling import EdgeCaseHandler, EdgeCaseResult, MetricZeroTPEdgeCaseHandling
    from panoptica.utils.label_group import LabelGroup, LabelMergeGroup
    from panoptica.utils.segmentation_class import SegmentationClassGroups
    disable_citation_reminder()   # printed on every first evaluation; the README cites panoptica

    def zero_tp(result):  # no lesion on either side: NaN; otherwise no match scores `result`
        return MetricZeroTPEdgeCaseHandling(empty_prediction_result=result, empty_reference_result=result,
                                            no_instances_result=EdgeCaseResult.NAN, normal=result)

    metrics = [Metric.DSC, Metric.NSD, Metric.HD95]
    groups = {r.lower(): (LabelMergeGroup if len(labels) > 1 else LabelGroup)(list(labels))
              for r, labels in label_groups(layout).items()}
    # WT and TC share labels with ET, NETC, SNFH by design: panoptica prints a notice about it
    with contextlib.redirect_stdout(io.StringIO()):
        groups = SegmentationClassGroups(groups)
    return Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(),
        instance_matcher=MaxBipartiteMatching(matching_metric=Metric.DSC, matching_threshold=1e-6),
        edge_case_handler=EdgeCaseHandler({Metric.DSC: zero_tp(EdgeCaseResult.ZERO),
                                           Metric.NSD: zero_tp(EdgeCaseResult.ZERO),
                                           Metric.HD95: zero_tp(EdgeCaseResult.INF)},
                                          empty_list_std=EdgeCaseResult.NAN),
        segmentation_class_groups=groups, instance_metrics=metrics, global_metrics=metrics)


def score_lesionwise(pred: np.ndarray, ref: np.ndarray, spacing, layout: str) -> dict:
    """pred, ref: label maps of convention ``layout`` (array axes in the order of ``spacing``, mm).

    -> {'all_instance_tp_wt': .., 'lesionwise_dsc_mean_wt': .., ..., for WT, TC, ET, NETC, SNFH}.
    Raises ValueError (panoptica's) for input it cannot score.
    """
    with warnings.catch_warnings():
        # panoptica's global NSD uses a 0.5-voxel tolerance and warns that it does, every time
        warnings.filterwarnings("ignore", message="The threshold is set to 0.5")
        results = evaluator(layout).evaluate(np.ascontiguousarray(pred, np.uint8),
                                             np.ascontiguousarray(ref, np.uint8),
                                             voxelspacing=tuple(float(s) for s in spacing))
    out = {}
    for region in REGIONS:
        got = results[region.lower()].to_dict(True)
        for metric, field in FIELDS.items():
            v = got.get(field, np.nan)
            v = np.nan if v is None else v
            if metric == "global_hd95" and np.isinf(v):
                v = MAX_HD95
            out[column(metric, region)] = int(v) if field in ("tp", "fp", "fn") else float(v)
    return out


def region_means(rows: list[dict], metric: str, regions=REGIONS) -> list[float]:
    """Mean of one metric over cases, per region, leaving out the cases where it is NaN (as the
    official parser's mean row does); NaN where no case has a value."""
    out = []
    for r in regions:
        v = np.array([row[column(metric, r)] for row in rows], float)
        v = v[~np.isnan(v)]
        out.append(float(v.mean()) if v.size else float("nan"))
    return out
