"""The challenges' metrics, each against its reference (sklearn, the challenge's definition in
numpy, isic-challenge-scoring where installed), fed by a real SupervisedEvaluator from the
bundle-config snippets the lead wires into the bundles (METRIC_CONFIGS)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.transforms import Activationsd, AsDiscreted, Compose
from scipy import ndimage
from scipy.spatial.distance import cdist
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from medadapt.engine.metrics import BRATS_EMPTY_DISTANCE_MM

FROM_ENGINE = "$monai.handlers.from_engine(['pred', 'label'])"


def _handler(metric_fn: dict, output_transform: str = FROM_ENGINE) -> dict:
    return {"_target_": "IgniteMetricHandler", "metric_fn": metric_fn, "output_transform": output_transform}


def _region(metric_fn: dict, channel: int) -> dict:
    return _handler(metric_fn, f"$medadapt.engine.metrics.select_channel({channel})")


DICE_COUNTING_EMPTY = {"_target_": "DiceMetric", "include_background": True, "ignore_empty": False}
BRATS_HD95 = {"_target_": "medadapt.engine.metrics.BratsHausdorffDistanceMetric"}
MONAI_HD95 = {"_target_": "HausdorffDistanceMetric", "include_background": True, "percentile": 95}

# What the report gives the lead for the bundle configs, as the configs would hold it.
METRIC_CONFIGS = {
    "val_balanced_accuracy": {
        "_target_": "medadapt.engine.metrics.BalancedAccuracy",
        "num_classes": "@num_classes",
        "output_transform": "$medadapt.engine.metrics.class_output()",
    },
    "val_macro_f1": {
        "_target_": "medadapt.engine.metrics.MacroF1",
        "num_classes": "@num_classes",
        "output_transform": "$medadapt.engine.metrics.class_output()",
    },
    "val_dice": _handler(DICE_COUNTING_EMPTY),
    "val_jaccard": _handler({"_target_": "MeanIoU", "include_background": True, "ignore_empty": False}),
    "val_thresholded_jaccard": _handler({"_target_": "medadapt.engine.metrics.ThresholdedJaccardMetric"}),
    "val_fp_rate_empty_reference": _handler({"_target_": "medadapt.engine.metrics.EmptyReferenceFalsePositiveRateMetric"}),
    **{f"val_dice_{name}": _region(DICE_COUNTING_EMPTY, i) for i, name in enumerate(("tc", "wt", "et"))},
    **{f"val_hd95_{name}": _region(BRATS_HD95, i) for i, name in enumerate(("tc", "wt", "et"))},
    # MONAI's own per-region HD95, for the comparison below (not for the bundles)
    **{f"monai_hd95_{name}": _region(MONAI_HD95, i) for i, name in enumerate(("tc", "wt", "et"))},
}


def evaluate(items: list[dict], names: list[str], num_classes: int = 0, postprocessing=None) -> SupervisedEvaluator:
    """Run a SupervisedEvaluator with an identity network over items whose "image" is the
    network's output, with the named metrics built from their bundle configs (the first is the
    key metric, as the one that picks the checkpoint)."""
    parser = ConfigParser({"imports": ["$import monai", "$import medadapt", "$import medadapt.engine.metrics"],
                           "num_classes": num_classes, **{name: METRIC_CONFIGS[name] for name in names}})
    parser.get_parsed_content("imports")  # as a bundle's workflow runs its imports first
    metrics = {name: parser.get_parsed_content(name) for name in names}
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(items, batch_size=3),  # several batches, the last one short
        network=torch.nn.Identity(),
        postprocessing=postprocessing,
        key_val_metric={names[0]: metrics[names[0]]},
        additional_metrics={name: metrics[name] for name in names[1:]},
    )
    evaluator.run()
    return evaluator


# ---------------------------------------------------------------- classification (ISIC 2019)


def _logits_predicting(predicted: np.ndarray, num_classes: int, rng) -> np.ndarray:
    """Random logits whose argmax is ``predicted``."""
    logits = rng.normal(size=(len(predicted), num_classes))
    logits[np.arange(len(predicted)), predicted] = logits.max(axis=1) + rng.uniform(0.1, 1, len(predicted))
    return logits


def _classification_cases():
    rng = np.random.default_rng(0)
    k, n = 5, 23
    skewed = rng.choice(k, size=n, p=[0.55, 0.25, 0.1, 0.05, 0.05])
    # a classifier that leans to the majority class: accurate, but not balanced
    yield "imbalanced", k, skewed, np.where(rng.random(n) < 0.5, skewed, 0), rng
    labels = rng.choice([0, 1, 2, 4], size=n)  # class 3 is never labelled ...
    yield "a class predicted but absent from the labels", k, labels, np.where(rng.random(n) < 0.3, 3, labels), rng
    labels, predicted = rng.integers(0, 3, n), rng.integers(0, 3, n)  # classes 3 and 4 nowhere
    yield "classes absent from labels and predictions", k, labels, predicted, rng
    yield "every prediction one class", k, rng.integers(0, k, n), np.full(n, 2), rng
    yield "one labelled class", k, np.full(n, 1), rng.integers(0, k, n), rng
    labels = rng.integers(0, 3, n)
    yield "perfect", 3, labels, labels, rng


CLASSIFICATION_CASES = list(_classification_cases())


def _classification_items(labels, predicted, num_classes, rng) -> tuple[list[dict], np.ndarray]:
    logits = _logits_predicting(predicted, num_classes, rng)
    items = [{"image": torch.as_tensor(row, dtype=torch.float32), "label": torch.tensor([label])}
             for row, label in zip(logits, labels)]
    return items, logits


@pytest.mark.parametrize("case", CLASSIFICATION_CASES, ids=[case[0] for case in CLASSIFICATION_CASES])
def test_balanced_accuracy_and_macro_f1_are_sklearns(case):
    _, num_classes, labels, predicted, rng = case
    items, _ = _classification_items(labels, predicted, num_classes, rng)
    evaluator = evaluate(items, ["val_balanced_accuracy", "val_macro_f1"], num_classes)
    with warnings.catch_warnings():  # sklearn warns of classes predicted but never labelled
        warnings.simplefilter("ignore", UserWarning)
        expected_balanced = balanced_accuracy_score(labels, predicted)
    expected_f1 = f1_score(labels, predicted, average="macro", zero_division="warn")
    assert evaluator.state.metrics["val_balanced_accuracy"] == pytest.approx(expected_balanced, abs=1e-12)
    assert evaluator.state.metrics["val_macro_f1"] == pytest.approx(expected_f1, abs=1e-12)
    assert evaluator.state.best_metric == pytest.approx(expected_balanced, abs=1e-12)  # the key metric


def test_balanced_accuracy_is_not_plain_accuracy():
    """On the imbalanced case the pooled counts (MONAI's ConfusionMatrix reduction) give plain
    accuracy; the balanced accuracy must differ, and macro F1 must differ from micro F1."""
    _, num_classes, labels, predicted, rng = CLASSIFICATION_CASES[0]
    items, _ = _classification_items(labels, predicted, num_classes, rng)
    metrics = evaluate(items, ["val_balanced_accuracy", "val_macro_f1"], num_classes).state.metrics
    assert abs(metrics["val_balanced_accuracy"] - accuracy_score(labels, predicted)) > 0.05
    assert abs(metrics["val_macro_f1"] - f1_score(labels, predicted, average="micro")) > 0.05


def test_balanced_accuracy_is_the_isic_2019_scorers():
    scoring = pytest.importorskip("isic_challenge_scoring.metrics")
    import pandas as pd

    for _, num_classes, labels, predicted, rng in CLASSIFICATION_CASES:
        items, logits = _classification_items(labels, predicted, num_classes, rng)
        metrics = evaluate(items, ["val_balanced_accuracy"], num_classes).state.metrics
        categories = [f"class{i}" for i in range(num_classes)]
        truth = pd.DataFrame(np.eye(num_classes)[labels], columns=categories)
        probabilities = pd.DataFrame(torch.as_tensor(logits).softmax(dim=1).numpy(), columns=categories)
        expected = scoring.balanced_multiclass_accuracy(truth, probabilities, pd.Series(np.ones(len(labels))))
        assert metrics["val_balanced_accuracy"] == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------- binary masks (ISIC 2018, BUSI)

# Bundles binarise the network's logits so (recipes/segmentation.json, multilabel).
BINARY_POSTPROCESSING = Compose([Activationsd(keys="pred", sigmoid=True), AsDiscreted(keys="pred", threshold=0.5)])


def _disc(size: int, centre, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _mask_pairs(rng, size: int = 24) -> list[tuple[np.ndarray, np.ndarray]]:
    """(reference, prediction) pairs: shifted and rescaled discs (Jaccards on both sides of
    0.65), a missed lesion, a lesion on an empty reference, an empty pair and a full pair."""
    pairs = []
    for _ in range(9):
        centre, radius = rng.uniform(8, 16, 2), rng.uniform(3, 7)
        shift, scale = rng.uniform(-3, 3, 2), rng.uniform(0.7, 1.3)
        pairs.append((_disc(size, centre, radius), _disc(size, centre + shift, radius * scale)))
    empty, full, lesion = np.zeros((size, size), bool), np.ones((size, size), bool), _disc(size, (12, 12), 5)
    return pairs + [(lesion, empty), (empty, lesion), (empty, empty), (full, full)]


def _normal_pairs(rng, size: int = 24) -> list[tuple[np.ndarray, np.ndarray]]:
    """BUSI-like: lesions, and "normal" images (empty references), some with a false lesion."""
    empty = np.zeros((size, size), bool)
    spurious = [(empty, _disc(size, rng.uniform(5, 19, 2), rng.uniform(1, 4))) for _ in range(3)]
    return _mask_pairs(rng, size)[:9] + spurious + [(empty, empty)] * 4


def _mask_items(pairs) -> list[dict]:
    def logits(mask):  # what the network outputs, binarised back by BINARY_POSTPROCESSING
        return torch.as_tensor(np.where(mask, 4.0, -4.0)[None], dtype=torch.float32)

    return [{"image": logits(prediction), "label": torch.as_tensor(reference[None], dtype=torch.float32)}
            for reference, prediction in pairs]


def challenge_jaccard(reference: np.ndarray, prediction: np.ndarray) -> float:
    """ISIC 2018's Jaccard of one image; 1 for an empty prediction on an empty reference, as its scorer."""
    union = np.logical_or(reference, prediction).sum()
    return 1.0 if union == 0 else np.logical_and(reference, prediction).sum() / union


def challenge_dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    total = reference.sum() + prediction.sum()
    return 1.0 if total == 0 else 2 * np.logical_and(reference, prediction).sum() / total


def thresholded_jaccard(reference: np.ndarray, prediction: np.ndarray) -> float:
    jaccard = challenge_jaccard(reference, prediction)
    return jaccard if jaccard >= 0.65 else 0.0


ISIC_2018_METRICS = ["val_thresholded_jaccard", "val_jaccard", "val_dice"]


def test_isic_2018_metrics_are_the_challenges():
    pairs = _mask_pairs(np.random.default_rng(1))
    jaccards = [challenge_jaccard(*pair) for pair in pairs]
    assert min(jaccards) < 0.65 < max(j for j in jaccards if j < 1)  # the threshold matters here
    metrics = evaluate(_mask_items(pairs), ISIC_2018_METRICS, postprocessing=BINARY_POSTPROCESSING).state.metrics
    assert metrics["val_thresholded_jaccard"] == pytest.approx(np.mean([thresholded_jaccard(*p) for p in pairs]))
    assert metrics["val_jaccard"] == pytest.approx(np.mean(jaccards))
    assert metrics["val_dice"] == pytest.approx(np.mean([challenge_dice(*p) for p in pairs]))
    assert metrics["val_thresholded_jaccard"] < metrics["val_jaccard"]


def test_isic_2018_metrics_are_the_scorers():
    scoring = pytest.importorskip("isic_challenge_scoring.segmentation")
    pairs = _mask_pairs(np.random.default_rng(2))
    metrics = evaluate(_mask_items(pairs), ISIC_2018_METRICS, postprocessing=BINARY_POSTPROCESSING).state.metrics
    images = [SimpleNamespace(image_id=f"ISIC_{i:07d}", truth_image=reference.astype(np.uint8) * 255,
                              prediction_image=prediction.astype(np.uint8) * 255)
              for i, (reference, prediction) in enumerate(pairs)]
    scorer = scoring.SegmentationScore(images).macro_average
    assert metrics["val_thresholded_jaccard"] == pytest.approx(scorer["threshold_jaccard"])
    assert metrics["val_jaccard"] == pytest.approx(scorer["jaccard"])
    assert metrics["val_dice"] == pytest.approx(scorer["dice"])


BUSI_METRICS = ["val_dice", "val_fp_rate_empty_reference"]


def test_dice_counts_normal_images_and_fp_rate_is_their_share_with_a_lesion():
    pairs = _normal_pairs(np.random.default_rng(3))
    metrics = evaluate(_mask_items(pairs), BUSI_METRICS, postprocessing=BINARY_POSTPROCESSING).state.metrics
    normals = [prediction.any() for reference, prediction in pairs if not reference.any()]
    assert metrics["val_dice"] == pytest.approx(np.mean([challenge_dice(*pair) for pair in pairs]))
    assert metrics["val_fp_rate_empty_reference"] == pytest.approx(np.mean(normals))
    assert 0 < metrics["val_fp_rate_empty_reference"] < 1


def test_fp_rate_on_normal_images_only_and_nan_without_any():
    empty, lesion = np.zeros((24, 24), bool), _disc(24, (12, 12), 5)
    clean = evaluate(_mask_items([(empty, empty)] * 4 + [(lesion, empty)]), BUSI_METRICS,
                     postprocessing=BINARY_POSTPROCESSING).state.metrics
    assert clean["val_fp_rate_empty_reference"] == 0.0  # the missed lesion is no false positive
    assert clean["val_dice"] == pytest.approx(0.8)  # four normals at 1, the missed lesion at 0
    all_lesions = evaluate(_mask_items([(lesion, lesion), (lesion, empty)]), BUSI_METRICS,
                           postprocessing=BINARY_POSTPROCESSING).state.metrics
    assert np.isnan(all_lesions["val_fp_rate_empty_reference"])


# ------------------------------------------------------------------------- BraTS (TC, WT, ET)

REGIONS = ("tc", "wt", "et")


def _ball(shape, centre, radius: float) -> np.ndarray:
    grid = np.indices(shape)
    return sum((axis - c) ** 2 for axis, c in zip(grid, centre)) <= radius**2


def _brats_cases(rng, shape=(14, 14, 10)):
    """(reference, prediction) channel stacks (3, ...): random balls per region, with ET missed
    in one case, predicted without reference in another, and absent from both in a third."""
    def regions():
        return np.stack([_ball(shape, rng.uniform(4, 9, 3), rng.uniform(1.5, 3.5)) for _ in REGIONS])

    cases = [(regions(), regions()) for _ in range(4)]
    cases[1][0][2] = False  # ET predicted where the reference has none
    cases[2][1][2] = False  # ET missed
    cases[3][0][2] = cases[3][1][2] = False  # ET in neither
    return cases


def _surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a background face neighbour (outside the grid is background)."""
    return np.argwhere(mask & ~ndimage.binary_erosion(mask, border_value=0))


def reference_hd95(reference: np.ndarray, prediction: np.ndarray, spacing, empty: float | None) -> float:
    """BraTS's HD95 of one region: the larger of the two directed 95th percentiles of surface
    distances in mm; ``empty`` for a missed or spurious region, 0 if both are empty (None: nan)."""
    if not reference.any() or not prediction.any():
        if empty is None:
            return np.nan
        return empty if reference.any() or prediction.any() else 0.0
    distances = cdist(_surface(reference) * spacing, _surface(prediction) * spacing)
    return max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95))


def _brats_items(cases, spacing) -> list[dict]:
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))

    def volume(masks):
        return MetaTensor(torch.as_tensor(masks, dtype=torch.float32), affine=affine)

    return [{"image": volume(prediction), "label": volume(reference)} for reference, prediction in cases]


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.2, 2.5)])
def test_brats_per_region_dice_and_hd95_are_the_challenges(spacing):
    cases = _brats_cases(np.random.default_rng(4))
    names = [f"val_{metric}_{region}" for metric in ("hd95", "dice") for region in REGIONS]
    metrics = evaluate(_brats_items(cases, spacing), names).state.metrics
    for channel, region in enumerate(REGIONS):
        hd95 = [reference_hd95(ref[channel], pred[channel], np.array(spacing), BRATS_EMPTY_DISTANCE_MM)
                for ref, pred in cases]
        dice = [challenge_dice(ref[channel], pred[channel]) for ref, pred in cases]
        assert metrics[f"val_hd95_{region}"] == pytest.approx(np.mean(hd95), rel=1e-5)
        assert metrics[f"val_dice_{region}"] == pytest.approx(np.mean(dice), rel=1e-6)
    assert metrics["val_hd95_et"] > BRATS_EMPTY_DISTANCE_MM / 4  # ET's miss and false region count


@pytest.mark.filterwarnings("ignore:the (ground truth|prediction) of class 0 is all 0")
def test_monai_hd95_per_region_is_in_voxels_and_leaves_empty_regions_out():
    """What the bundles' MONAI HausdorffDistance with select_channel(i) reports, for the record:
    per-region HD95 in voxels, whatever the spacing, with missed, spurious and absent regions
    left out of the mean rather than scored."""
    cases = _brats_cases(np.random.default_rng(4))
    names = [f"monai_hd95_{region}" for region in REGIONS]
    metrics = evaluate(_brats_items(cases, (0.8, 1.2, 2.5)), names).state.metrics
    for channel, region in enumerate(REGIONS):
        hd95 = [reference_hd95(ref[channel], pred[channel], np.ones(3), empty=None) for ref, pred in cases]
        assert metrics[f"monai_hd95_{region}"] == pytest.approx(np.nanmean(hd95), rel=1e-5)
    assert metrics["monai_hd95_et"] < BRATS_EMPTY_DISTANCE_MM / 4
