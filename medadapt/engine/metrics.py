"""Output transforms that feed MONAI's and ignite's metric handlers from decollated batches, and
the challenges' own metrics where MONAI's differ from them (see each class)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from ignite.metrics import ConfusionMatrix
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.metrics import (
    CumulativeIterationMetric,
    HausdorffDistanceMetric,
    compute_iou,
)
from monai.metrics.utils import do_metric_reduction, ignore_background
from monai.utils import MetricReduction


def select_channel(index: int, keys: tuple[str, str] = ("pred", "label")) -> Callable:
    """One channel of decollated predictions and labels, so a MONAI metric handler reports a
    per-region score (TC, WT, ET)."""

    def transform(output):
        items = output if isinstance(output, list) else [output]
        preds = [item[keys[0]][index : index + 1] for item in items]
        labels = [item[keys[1]][index : index + 1] for item in items]
        return preds, labels

    return transform


def class_output(keys: tuple[str, str] = ("pred", "label")) -> Callable:
    """Stacked logits and class indices, for ignite's classification metrics."""

    def transform(output):
        items = output if isinstance(output, list) else [output]
        pred = torch.stack([torch.as_tensor(item[keys[0]]) for item in items])
        label = torch.stack([torch.as_tensor(item[keys[1]]).reshape(-1)[0] for item in items]).long()
        return pred, label

    return transform


def onehot_output(num_classes: int, keys: tuple[str, str] = ("pred", "label")) -> Callable:
    """One-hot argmax and one-hot label, for MONAI's confusion-matrix metrics."""

    def transform(output):
        pred, label = class_output(keys)(output)
        eye = torch.eye(num_classes, device=pred.device)
        return list(eye[pred.argmax(dim=1)]), list(eye[label])

    return transform


def probability_output(num_classes: int, keys: tuple[str, str] = ("pred", "label")) -> Callable:
    """Softmax probabilities and one-hot labels, for MONAI's ROCAUC."""

    def transform(output):
        pred, label = class_output(keys)(output)
        return list(pred.softmax(dim=1)), list(torch.eye(num_classes, device=pred.device)[label])

    return transform


# Classification: ignite metrics over the confusion matrix of the whole validation set (summed
# across processes by ignite), fed by class_output(). MONAI's ConfusionMatrix handler pools the
# classes' counts before dividing, which for one-hot outputs is plain accuracy.


class BalancedAccuracy(ConfusionMatrix):
    """ISIC 2019's ranking metric: the mean over classes of per-class recall, as
    ``sklearn.metrics.balanced_accuracy_score``. A class absent from the labels has no recall and
    is left out of the mean, even where it is predicted (sklearn warns and does the same).

    Arguments:
      num_classes: the classifier's outputs.
      output_transform: to (logits (B, C), class indices (B,)), e.g. ``class_output()``.
    """

    def compute(self) -> float:
        counts = super().compute().double()  # rows: the label, columns: the argmax prediction
        support = counts.sum(dim=1)
        labelled = support > 0
        return (counts.diagonal()[labelled] / support[labelled]).mean().item()


class MacroF1(ConfusionMatrix):
    """The unweighted mean over classes of F1, as ``sklearn.metrics.f1_score(average="macro")``
    with its default labels: the classes in the labels or the predictions. A class in neither is
    left out; every other class has 2 TP + FP + FN > 0, so sklearn's ``zero_division`` never
    applies (a class predicted but never labelled, or labelled but never predicted, scores 0).

    Arguments: as ``BalancedAccuracy``.
    """

    def compute(self) -> float:
        counts = super().compute().double()
        twice_tp_fp_fn = counts.sum(dim=0) + counts.sum(dim=1)  # 2 TP + FP + FN per class
        seen = twice_tp_fp_fn > 0
        return (2 * counts.diagonal()[seen] / twice_tp_fp_fn[seen]).mean().item()


# Segmentation: MONAI cumulative metrics on binarised, channel-first masks, for a bundle's
# {"_target_": "IgniteMetricHandler", "metric_fn": {...}, "output_transform": ...}. Each keeps
# per-image values, so the handler saves them in engine.state.metric_details.


class ThresholdedJaccardMetric(CumulativeIterationMetric):
    """ISIC 2018 task 1's ranking metric: per image, the Jaccard index, counted as 0 below
    ``threshold``; the mean over images. Like the challenge's scorer (isic-challenge-scoring), an
    empty prediction on an empty reference scores 1.

    Arguments:
      threshold: the challenge's 0.65.
      include_background: whether the first channel counts (a binary mask's only channel does).
      reduction: MONAI's reduction of the (image, channel) values.
    """

    def __init__(self, threshold: float = 0.65, include_background: bool = True,
                 reduction: MetricReduction | str = MetricReduction.MEAN):
        super().__init__()
        self.threshold = threshold
        self.include_background = include_background
        self.reduction = reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        jaccard = compute_iou(y_pred, y, include_background=self.include_background, ignore_empty=False)
        return torch.where(jaccard >= self.threshold, jaccard, torch.zeros_like(jaccard))

    def aggregate(self, reduction: MetricReduction | str | None = None) -> torch.Tensor:
        return do_metric_reduction(self.get_buffer(), reduction or self.reduction)[0]


class EmptyReferenceFalsePositiveRateMetric(CumulativeIterationMetric):
    """The share of empty references (BUSI's "normal" images: per image and channel) on which the
    prediction has any foreground. References with foreground do not count (nan in the per-image
    values); with no empty reference at all the rate is nan, not 0.

    Arguments:
      include_background: whether the first channel counts (a binary mask's only channel does).
    """

    def __init__(self, include_background: bool = True):
        super().__init__()
        self.include_background = include_background

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        if not self.include_background:
            y_pred, y = ignore_background(y_pred, y)
        empty_reference = ~foreground(y)
        return torch.where(empty_reference, foreground(y_pred).float(), torch.nan)

    def aggregate(self) -> torch.Tensor:
        per_reference = self.get_buffer()
        # MONAI's mean reduction would give 0 where nothing counts: no empty reference is no evidence
        return per_reference.nanmean()


BRATS_EMPTY_DISTANCE_MM = 373.13  # the diagonal of BraTS's 240 x 240 x 155 grid of 1 mm voxels


class BratsHausdorffDistanceMetric(HausdorffDistanceMetric):
    """The symmetric 95th-percentile Hausdorff distance per image and channel (per region with
    ``select_channel``), in mm, with the BraTS challenge's convention for empty masks: a region
    missed, or predicted where the reference has none, scores ``empty_distance``; both empty
    score 0. MONAI's HausdorffDistanceMetric gives nan in all three cases, which its mean leaves
    out, so a missed region would go unpunished.

    Distances are in the reference's voxel spacing (its MetaTensor affine), which MONAI's handler
    never passes (it measures in voxels); plain tensors are measured in voxels.

    Arguments:
      include_background: whether the first channel counts (BraTS's TC/WT/ET channels all do).
      percentile: 95 for HD95; None for the maximum.
      empty_distance: the distance for a missed or spurious region.
      reduction: MONAI's reduction of the (image, channel) values.
    """

    def __init__(self, include_background: bool = True, percentile: float | None = 95,
                 empty_distance: float = BRATS_EMPTY_DISTANCE_MM,
                 reduction: MetricReduction | str = MetricReduction.MEAN):
        super().__init__(include_background=include_background, percentile=percentile, reduction=reduction)
        self.empty_distance = empty_distance

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        kwargs.setdefault("spacing", voxel_spacing(y))
        with warnings.catch_warnings():  # empty masks are expected here, and scored below
            warnings.filterwarnings("ignore", message=".* is all 0, this may result in nan/inf distance")
            distance = super()._compute_tensor(y_pred, y, **kwargs)
        if not self.include_background:
            y_pred, y = ignore_background(y_pred, y)
        predicted, present = foreground(y_pred), foreground(y)
        one_sided = torch.full_like(distance, self.empty_distance)
        return torch.where(predicted & present, distance,
                           torch.where(predicted | present, one_sided, torch.zeros_like(distance)))


def foreground(masks: torch.Tensor) -> torch.Tensor:
    """Whether each (image, channel) of binarised masks (B, C, ...) has any foreground: (B, C)."""
    return masks.flatten(2).bool().any(dim=2)


def voxel_spacing(masks: torch.Tensor) -> list | None:
    """The spacing of batched masks (B, C, ...) from their MetaTensor affine, per image where the
    batch carries one affine each; None (unit spacing) for plain tensors."""
    if not isinstance(masks, MetaTensor):
        return None
    affines = masks.affine.reshape(-1, *masks.affine.shape[-2:])
    spacings = [affine_to_spacing(affine, r=masks.ndim - 2).tolist() for affine in affines]
    return spacings if len(spacings) == len(masks) else spacings[0]
