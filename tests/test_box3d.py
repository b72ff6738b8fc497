"""3D interactive segmentation: a box on one slice carried through a volume (`medadapt.propagate_boxes`).

The propagation logic is checked with a stand-in box model whose answer is known (the bright
voxels inside the box), on the real MNI152 brain; the stand-in also comes split into an encoder
and a decoder, as BoxPromptSegmenter is, to check that each slice is encoded once and that
embeddings are reused across requests. A tiny BoxPromptSegmenter checks that the split model
gives what the whole model gives. The real LiteMedSAM (pretrained weights) is checked on the
MNI152 T1 template against its brain mask, in Python and through the ``litemedsam_box3d`` model
of a real ``medadapt label`` server.
"""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import medadapt
from medadapt.models.box_propagation import (
    STOP_BLANK,
    STOP_EDGE,
    STOP_EMPTY,
    STOP_UNSURE,
    STOP_VANISHED,
    EmbeddingCache,
    box_of_mask,
    propagate_boxes,
    window_volume,
)

# Dice of the MNI152 brain mask from one box on the middle axial slice (4 mm) with LiteMedSAM's
# weights, measured by benchmarks/box3d_mni152.py --resolution 4: 0.638 propagated in float32
# (0.634 as served: bfloat16 encoder, channels-last weights), 0.714 with the reference box on
# every slice (LiteMedSAM leaves out much of the cortex). The bound leaves
# room for numerical differences between machines, not for a broken propagation.
MIN_PROPAGATED_DICE = 0.55
# Over the brain's top eleven slices from a box six below its top (the test below): 0.619
# measured with contiguous weights, 0.607 as served, the run ending "unsure" on the first slice
# above the brain.
MIN_TOP_DICE = 0.55
# Over the 2 mm brain's slices 40-48 from a box on slice 40 (the test below): 0.570 measured
# in float32, 0.568 with the bfloat16 encoder, either layout (LiteMedSAM misses much of the
# cortex there).
MIN_2MM_DICE = 0.5


class BrightInsideBox(nn.Module):
    """A stand-in box-prompted model: inside the box (inclusive pixel indices) logits
    20 * (intensity - ``level``), so voxels above ``level`` are the object and the model is
    sure of those at 1 (probability 1.0) but not of those at 0.6 (0.88); -10 outside the box.
    It records the boxes it was given."""

    def __init__(self, level: float = 0.5):
        super().__init__()
        self.level = level
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.calls: list[list[float]] = []

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        assert images.shape[1] == 3 and boxes.shape == (images.shape[0], 4)
        out = torch.full((images.shape[0], 1, *images.shape[2:]), -10.0)
        for n, box in enumerate(boxes.tolist()):
            self.calls.append(box)
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            inside = torch.zeros(images.shape[2:], dtype=torch.bool)
            inside[y0:y1 + 1, x0:x1 + 1] = True
            out[n, 0][inside] = 20.0 * (images[n, 0][inside] - self.level)
        return out


class EncodedApart(BrightInsideBox):
    """The stand-in split as BoxPromptSegmenter is: ``encode`` (the images are their own
    embedding) and ``decode``; it records each image it encodes."""

    def __init__(self, level: float = 0.5):
        super().__init__(level)
        self.batches: list[torch.Tensor] = []

    @property
    def encoded(self) -> list[torch.Tensor]:
        return [image for batch in self.batches for image in batch]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.batches.append(images)
        return images.clone()

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        assert tuple(embeddings.shape[-2:]) == tuple(size)
        return self(embeddings.float(), boxes)  # kept in bfloat16 where the encoder ran in it


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def box_of(mask2d: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask2d)
    return [float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())]


def extent(mask: np.ndarray, axis: int) -> list[int]:
    other = tuple(a for a in range(3) if a != axis)
    slices = np.flatnonzero(mask.any(axis=other))
    return [int(slices[0]), int(slices[-1])] if slices.size else []


@pytest.fixture(scope="module")
def mni():
    """The MNI152 T1 template and brain mask at 4 mm (every second voxel of the 2 mm ones)."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=2)
    brain = datasets.load_mni152_brain_mask(resolution=2).get_fdata()[::2, ::2, ::2] > 0
    affine = t1.affine.copy()
    affine[:3, :3] *= 2
    return {"t1": t1.get_fdata().astype(np.float32)[::2, ::2, ::2], "brain": brain, "affine": affine}


# ---------------------------------------------------------------------------- propagation logic
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_one_box_follows_the_object_through_the_volume_and_stops_where_it_ends(mni, axis):
    # The brain mask over faint noise (under the stand-in's level): slices beyond the brain are
    # not blank, the model is asked about them and finds nothing.
    brain = mni["brain"] + 0.1 * np.random.default_rng(0).random(mni["brain"].shape, dtype=np.float32)
    middle = int(np.mean(extent(brain, axis)))
    model = BrightInsideBox()
    # The brain's end slices are small (2 voxels): here only an empty mask may stop the run.
    result = propagate_boxes(model, brain, {middle: box_of(mni["brain"].take(middle, axis=axis))}, axis,
                             window=False, min_pixels=1, min_area_fraction=0)
    # The stand-in segments exactly what lies in its box, so the carried boxes must have found
    # the whole brain (its outline grows slice by slice: the enlarged boxes keep up).
    assert dice(result.mask, mni["brain"]) > 0.99
    assert [result.slices[0], result.slices[-1]] == extent(mni["brain"], axis)
    # Stopped by the empty slice just outside the brain (or the volume's edge, which the 4 mm
    # brain touches at the bottom of axis 2).
    first, last = extent(mni["brain"], axis)
    ends = [(first - 1, STOP_EMPTY) if first > 0 else (0, STOP_EDGE), (last + 1, STOP_EMPTY)]
    assert sorted(result.stops) == ends
    assert len(model.calls) == last - first + 1 + (first > 0) + 1  # each brain slice once, and the empty ends
    assert result.prompted == [middle]
    # The public one-box call gives the same mask.
    same = medadapt.segment_volume_from_box(BrightInsideBox(), brain, box_of(mni["brain"].take(middle, axis=axis)),
                                            middle, axis, window=False, min_pixels=1, min_area_fraction=0)
    assert np.array_equal(same, result.mask)


def test_a_blank_slice_or_an_unsure_mask_ends_the_run():
    volume = np.zeros((16, 16, 12), dtype=np.float32)
    volume[3:13, 3:13, 2:6] = 1.0
    volume[3:13, 3:13, 6:9] = 0.6  # still the object, but the stand-in is unsure of it (p = 0.88)
    model = BrightInsideBox()
    result = propagate_boxes(model, volume, {3: box_of(volume[:, :, 3])}, axis=2, window=False)
    assert sorted(result.stops) == [(1, STOP_BLANK), (6, STOP_UNSURE)] and extent(result.mask, 2) == [2, 5]
    assert len(model.calls) == 4 + 1  # slices 2-5 and the unsure 6; the blank slice 1 needs no model
    # What the rule compared: every segmented slice's share of sure voxels, the unsure one included.
    assert result.confidence == {2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0, 6: 0.0}
    sure = propagate_boxes(BrightInsideBox(), volume, {3: box_of(volume[:, :, 3])}, axis=2, window=False,
                           min_confidence=0)
    assert sorted(sure.stops) == [(1, STOP_BLANK), (9, STOP_BLANK)] and extent(sure.mask, 2) == [2, 8]


def test_a_vanishing_mask_ends_the_run():
    # A blob that shrinks to a 2 x 2 sliver past slice 6: 4 voxels, not empty, but under 5 % of
    # the 100 voxels it started from, so the object is taken to have ended there.
    volume = np.zeros((16, 16, 12), dtype=np.float32)
    volume[3:13, 3:13, 2:7] = 1.0
    volume[7:9, 7:9, 7:10] = 1.0
    result = propagate_boxes(BrightInsideBox(), volume, {4: box_of(volume[:, :, 4])}, axis=2, window=False)
    assert (7, STOP_VANISHED) in result.stops and extent(result.mask, 2) == [2, 6]
    kept = propagate_boxes(BrightInsideBox(), volume, {4: box_of(volume[:, :, 4])}, axis=2, window=False,
                           min_area_fraction=0.01)
    assert extent(kept.mask, 2) == [2, 9]  # 4 % of the start is kept under a 1 % rule


def test_the_box_indexes_columns_by_x_and_rows_by_y_both_ends_inclusive():
    volume = np.ones((7, 9, 11), dtype=np.float32)  # a slice of axis 0 is 9 rows x 11 columns
    model = BrightInsideBox()
    result = propagate_boxes(model, volume, {3: [2, 1, 8, 4]}, axis=0, window=False, slice_range=(3, 3))
    expected = np.zeros((9, 11), dtype=np.uint8)
    expected[1:5, 2:9] = 1  # rows y0..y1, columns x0..x1, inclusive
    assert np.array_equal(result.mask[3], expected)
    assert model.calls[0] == [2, 1, 8, 4]  # the user's box reaches the model unchanged
    assert not result.mask[[0, 1, 2, 4, 5, 6]].any()  # slice_range (3, 3): no propagation
    with pytest.raises(ValueError, match="outside the slice"):
        propagate_boxes(model, volume, {3: [2, 1, 11, 4]}, axis=0, window=False)  # x1 = 11 is past column 10
    with pytest.raises(ValueError, match="slice index 7"):
        propagate_boxes(model, volume, {7: [0, 0, 1, 1]}, axis=0, window=False)
    with pytest.raises(ValueError, match="single-channel 3D"):
        propagate_boxes(model, volume[None], {1: [0, 0, 1, 1]}, axis=0)


def test_more_boxes_correct_the_result_and_propagation_continues_from_each():
    # Two separate objects along axis 2: slices 3-8 and 14-19 (a gap of empty slices between).
    volume = np.zeros((20, 20, 24), dtype=np.float32)
    volume[4:12, 5:15, 3:9] = 1.0
    volume[8:16, 2:10, 14:20] = 1.0
    first_box = box_of(volume[:, :, 5])
    one = propagate_boxes(BrightInsideBox(), volume, {5: first_box}, axis=2, window=False)
    assert extent(one.mask, 2) == [3, 8]  # the first object only: the empty slices end it
    second_box = box_of(volume[:, :, 16])
    both = propagate_boxes(BrightInsideBox(), volume, {5: first_box, 16: second_box}, axis=2, window=False)
    assert dice(both.mask, volume) == 1.0
    assert both.boxes[5] == first_box and both.boxes[16] == second_box  # boxed slices use their boxes
    assert both.prompted == [5, 16]
    # Two boxes on one object: every slice is segmented once, from the nearer box.
    model = BrightInsideBox()
    near = propagate_boxes(model, volume, {4: box_of(volume[:, :, 4]), 7: box_of(volume[:, :, 7])}, axis=2,
                           window=False)
    assert dice(near.mask, volume * (np.arange(24) < 12)) == 1.0
    assert len(model.calls) == 6  # slices 3..8 once each (the blank 2 and 9 need no model)
    assert near.boxes[5] == box_of_mask(near.mask[:, :, 4]) and near.boxes[6] == box_of_mask(near.mask[:, :, 7])


def test_window_volume_is_medsams_mr_windowing():
    rng = np.random.default_rng(0)
    volume = np.zeros((10, 10, 10), dtype=np.float32)
    volume[2:8, 2:8, 2:8] = rng.gamma(2.0, 100.0, (6, 6, 6))
    windowed = window_volume(volume)
    inside = volume != 0
    low, high = np.percentile(volume[inside], (0.5, 99.5))
    assert windowed.min() == 0.0 and windowed.max() == 1.0
    assert not windowed[~inside].any()  # background stays 0
    assert np.isclose(windowed[volume >= high], 1.0).all() and np.isclose(windowed[inside & (volume <= low)], 0).all()
    order = np.argsort(volume[inside])
    assert np.all(np.diff(windowed[inside][order]) >= 0)  # monotone in between
    assert not window_volume(np.zeros((3, 3, 3))).any()


# ---------------------------------------------------------------------------- encoding apart, reuse
def blob_volume() -> np.ndarray:
    """A 10 x 10 object through slices 2-8 of axis 2 over faint noise (no slice is blank)."""
    volume = 0.1 * np.random.default_rng(0).random((16, 16, 12), dtype=np.float32)
    volume[3:13, 3:13, 2:9] = 1.0
    return volume


def blob_box(volume: np.ndarray, k: int, axis: int = 2) -> list[float]:
    return box_of(volume.take(k, axis=axis) > 0.5)


def test_each_slice_is_encoded_once_and_a_second_request_on_the_volume_encodes_nothing():
    volume, model, cache = blob_volume(), EncodedApart(), EmbeddingCache()
    first = propagate_boxes(model, volume, {5: blob_box(volume, 5)}, axis=2, window=False, cache=cache)
    # The object's slices 2-8, and 1 and 9 where its masks come out empty: each encoded once.
    assert sorted(first.encoded) == list(range(1, 10)) and first.reused == []
    assert len(model.encoded) == 9
    for k, image in zip(first.encoded, model.encoded):
        assert torch.equal(image[0], torch.from_numpy(volume[:, :, k]))
    # What the whole model called on each slice gives.
    whole = propagate_boxes(BrightInsideBox(), volume, {5: blob_box(volume, 5)}, axis=2, window=False)
    assert np.array_equal(first.mask, whole.mask) and first.boxes == whole.boxes and first.stops == whole.stops

    # A correction on the same volume, read again into another array: nothing is encoded again.
    boxes = {3: blob_box(volume, 3), 7: blob_box(volume, 7)}
    again = propagate_boxes(model, volume.copy(), boxes, axis=2, window=False, cache=cache)
    assert again.encoded == [] and sorted(again.reused) == list(range(1, 10)) and len(model.encoded) == 9
    assert np.array_equal(again.mask, propagate_boxes(BrightInsideBox(), volume, boxes, axis=2, window=False).mask)


def test_embeddings_are_not_reused_for_another_volume_axis_model_precision_or_changed_weights():
    volume, model, cache = blob_volume(), EncodedApart(), EmbeddingCache()

    def encoded(model, volume, axis=2, precision="float32") -> list[int]:
        box = {5: blob_box(volume, 5, axis)}
        return propagate_boxes(model, volume, box, axis, window=False, cache=cache, precision=precision).encoded

    assert encoded(model, volume) and not encoded(model, volume)  # filled, then all reused
    changed = volume.copy()
    changed[0, 0, 0] += 0.01
    assert encoded(model, changed)
    assert 5 in encoded(model, volume, axis=0)  # slice 5 of another axis is another image
    assert encoded(EncodedApart(), volume)
    assert encoded(model, volume, precision="bfloat16")
    with torch.no_grad():
        model.anchor.add_(1.0)  # weights changed in place, as loading or training adapters does
    assert encoded(model, volume)
    assert not encoded(model, volume)


def test_the_cache_is_bounded_least_recently_used_first_out_and_forgets_collected_models():
    cache = EmbeddingCache(max_bytes=3 * 400)
    for name in "abc":
        cache.put((0, name), torch.zeros(100))  # 400 bytes each
    assert cache.get((0, "a")) is not None  # "a" is now the most recently used
    cache.put((0, "d"), torch.zeros(100))
    assert (0, "b") not in cache and all((0, name) in cache for name in "acd")
    assert len(cache) == 3 and cache.nbytes == 1200
    cache.put((0, "big"), torch.zeros(400))  # larger than the bound: not kept, nothing dropped
    assert (0, "big") not in cache and len(cache) == 3

    # Through propagation: 9 slices encoded, the embeddings of 4 kept.
    volume, model = blob_volume(), EncodedApart()
    embedding_bytes = 3 * 16 * 16 * 4  # the stand-in's embedding of a slice: the (1, 3, 16, 16) image
    cache = EmbeddingCache(max_bytes=4 * embedding_bytes)
    result = propagate_boxes(model, volume, {5: blob_box(volume, 5)}, axis=2, window=False, cache=cache,
                             precision="float32")
    assert len(result.encoded) == 9 and len(cache) == 4 and cache.nbytes == 4 * embedding_bytes
    del model
    gc.collect()
    cache.put((-1, "another"), torch.zeros(1))  # a collected model's entries go at the next put
    assert len(cache) == 1


def test_encoding_ahead_encodes_each_slice_once_and_changes_no_result():
    volume = blob_volume()
    box = {5: blob_box(volume, 5)}
    one = propagate_boxes(EncodedApart(), volume, box, axis=2, window=False, cache=False)
    model = EncodedApart()
    ahead = propagate_boxes(model, volume, box, axis=2, window=False, cache=False, encode_batch=4)
    assert np.array_equal(ahead.mask, one.mask) and ahead.boxes == one.boxes and ahead.stops == one.stops
    # The boxed slice with the three above it, then 4-1 going down, then 9-11 (the volume ends):
    # slices 10 and 11 were encoded ahead and never needed.
    assert [len(batch) for batch in model.batches] == [4, 4, 3]
    assert ahead.encoded == [5, 6, 7, 8, 4, 3, 2, 1, 9, 10, 11]
    with pytest.raises(ValueError, match="encode_batch"):
        propagate_boxes(model, volume, box, axis=2, encode_batch=0)
    with pytest.raises(ValueError, match="precision"):
        propagate_boxes(model, volume, box, axis=2, precision="float16")


def tiny_box_model() -> nn.Module:
    """BoxPromptSegmenter at toy size: a two-block SAM ViT at 64 x 64 with DKA, random weights,
    SAM's prompt encoder and mask decoder."""
    torch.manual_seed(0)
    tiny = {"img_size": 64, "embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,),
            "window_size": 2}
    with pytest.warns(UserWarning):  # random weights
        return medadapt.create_model("box_segmentation", backbone="medsam_vit_b", backbone_options=tiny).eval()


class Whole(nn.Module):
    """``model`` called whole on each slice, as propagation ran before it encoded apart."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.model(images, boxes)


def test_box_prompt_segmenter_encoded_apart_gives_what_it_gives_whole():
    model = tiny_box_model()
    images, boxes = torch.rand(1, 3, 40, 48), torch.tensor([[2.0, 3.0, 30.0, 20.0]])
    with torch.no_grad():
        assert torch.equal(model.decode(model.encode(images), boxes, (40, 48)), model(images, boxes))
    volume = blob_volume()[:, :, :8]
    rules = {"min_pixels": 1, "min_area_fraction": 0, "min_confidence": 0}  # random weights: any mask goes on
    apart = propagate_boxes(model, volume, {4: blob_box(volume, 4)}, axis=2, precision="float32", cache=False, **rules)
    whole = propagate_boxes(Whole(model), volume, {4: blob_box(volume, 4)}, axis=2, **rules)
    assert len(apart.boxes) >= 4, apart.stops  # it did propagate
    assert np.array_equal(apart.mask, whole.mask) and apart.boxes == whole.boxes and apart.stops == whole.stops
    # In bfloat16 the kept embeddings take half the memory.
    full, half = EmbeddingCache(), EmbeddingCache()
    propagate_boxes(model, volume, {4: blob_box(volume, 4)}, axis=2, precision="float32", cache=full, slice_range=(4, 4))
    propagate_boxes(model, volume, {4: blob_box(volume, 4)}, axis=2, precision="bfloat16", cache=half, slice_range=(4, 4))
    assert len(full) == len(half) == 1 and half.nbytes * 2 == full.nbytes


# ---------------------------------------------------------------------------- real LiteMedSAM
@pytest.fixture(scope="module")
def litemedsam(tmp_path_factory):
    """The 3D box model as the label server builds it: pretrained LiteMedSAM, DKA = identity,
    convolution weights channels-last."""
    from medadapt.monailabel.specs import Box3DModel

    torch.manual_seed(0)
    return Box3DModel.default(runs=tmp_path_factory.mktemp("runs")).build_network(None).eval()


def test_the_served_box_model_runs_channels_last_and_encodes_as_the_contiguous_one(litemedsam):
    """Channels-last weights spare oneDNN a reorder at each call (docs/box3d.md, "Speed"); in
    float32 the embeddings are those of the contiguous model up to rounding."""
    import copy

    spatial = [m.weight for m in litemedsam.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[1] > 1
               and m.weight.shape[-1] > 1]
    assert spatial and all(w.is_contiguous(memory_format=torch.channels_last) for w in spatial)
    assert not all(w.is_contiguous() for w in spatial)
    contiguous = copy.deepcopy(litemedsam).to(memory_format=torch.contiguous_format)
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(litemedsam.encode(images), contiguous.encode(images), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_litemedsam_follows_the_brain_to_its_top_and_stops_there(mni, litemedsam):
    """The top of the brain (axial, 4 mm): a box six slices below its last slice, propagation
    free upwards to the volume's top and held to ten slices below (to keep the test short)."""
    brain, t1 = mni["brain"], mni["t1"]
    last = extent(brain, 2)[1]
    start, low = last - 6, last - 10
    cache = EmbeddingCache()
    result = propagate_boxes(litemedsam, t1, {start: box_of(brain[:, :, start])}, axis=2,
                             slice_range=(low, t1.shape[2] - 1), cache=cache)
    # Upwards the object ends inside the volume: the run stops on its own (not at the volume's
    # edge) at most two slices past the brain's last, and nothing is segmented above the brain.
    up = [(k, reason) for k, reason in result.stops if k > start]
    assert len(up) == 1 and up[0][1] != STOP_EDGE and last <= up[0][0] <= last + 2, result.stops
    assert result.slices[-1] <= last + 1 and not result.mask[:, :, last + 2:].any()
    score = dice(result.mask[:, :, low:], brain[:, :, low:])
    assert score > MIN_TOP_DICE, f"propagated Dice {score:.3f} over slices {low}..{last}"
    # Each slice the model saw was encoded once; the same request again encodes nothing (the
    # model's eval() rebuilds TinyViT's attention-bias buffers, which must not count as new
    # weights) and gives the same mask.
    judged = [k for k, reason in result.stops if reason in (STOP_EMPTY, STOP_VANISHED, STOP_UNSURE)]
    assert sorted(result.encoded) == sorted([*result.boxes, *judged])
    again = propagate_boxes(litemedsam, t1, {start: box_of(brain[:, :, start])}, axis=2,
                            slice_range=(low, t1.shape[2] - 1), cache=cache)
    assert again.encoded == [] and sorted(again.reused) == sorted(result.encoded)
    assert np.array_equal(again.mask, result.mask)


@pytest.mark.slow
def test_litemedsam_carries_the_2mm_brain_past_its_least_sure_slices(litemedsam):
    """The 2 mm brain centred in 128 x 128 x 100 (as benchmarks/run.py --only box3d has it), a
    box on its middle slice, held to eight slices upwards (to keep the test short): slices 46 and
    47 are the least sure of the brain (0.14 to 0.19 of their voxels sure, float32 and bfloat16,
    as BoxPropagation.confidence gives them; docs/box3d.md), where the old default rule (0.2)
    ended the run inside it."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=2).get_fdata().astype(np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=2).get_fdata() > 0
    pad = [((n - s) // 2, n - s - (n - s) // 2) for n, s in zip((128, 128, 100), t1.shape)]
    t1, brain = np.pad(t1, pad), np.pad(brain, pad)
    middle = int(np.mean(extent(brain, 2)))
    assert middle == 40
    result = propagate_boxes(litemedsam, t1, {middle: box_of(brain[:, :, middle])}, axis=2,
                             slice_range=(middle, middle + 8), cache=False)
    assert sorted(result.stops) == [(middle, STOP_EDGE), (middle + 8, STOP_EDGE)]  # the range's ends, not unsure
    assert result.slices == list(range(middle, middle + 9))
    assert min(result.confidence.values()) < 0.2  # the least sure slices were passed, not missed
    score = dice(result.mask[:, :, middle:middle + 9], brain[:, :, middle:middle + 9])
    assert score > MIN_2MM_DICE, f"propagated Dice {score:.3f} over slices {middle}..{middle + 8}"


# ---------------------------------------------------------------------------- served
@pytest.mark.slow
def test_served_box3d_model_answers_a_label_volume_with_the_inputs_grid(mni, tmp_path):
    import nibabel as nib
    from monailabel_server import _require_monailabel, label_server

    _require_monailabel()
    brain, t1 = mni["brain"], mni["t1"]
    first, last = extent(brain, 2)
    middle = (first + last) // 2
    # Five axial slices through the middle of the brain, stored with the x axis flipped (LAS):
    # prompts are indices of the stored array, which the server must not reorient.
    crop = slice(middle - 2, middle + 3)
    volume, mask = t1[::-1, :, crop], brain[::-1, :, crop]
    affine = np.diag([-1.0, 1.0, 1.0, 1.0]) @ mni["affine"]
    studies = tmp_path / "studies"
    studies.mkdir()
    nib.save(nib.Nifti1Image(volume, affine), studies / "mni_t1.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([volume, volume], -1), affine), studies / "two_channels.nii.gz")
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"models": {}, "include_box3d_model": True}))

    with label_server(tmp_path, str(studies), config) as server:
        info = server.get("/info/").json()["models"]["litemedsam_box3d"]
        assert info["dimension"] == 3 and info["type"] == "deepgrow"

        def infer(params, image="mni_t1"):
            return server.post("/infer/litemedsam_box3d", params={"image": image, "output": "image"},
                               files={"params": (None, json.dumps(params))})

        box = box_of(mask[:, :, 2])
        answer = infer({"box": box, "slice": 2, "axis": 2})
        assert answer.status_code == 200, answer.text
        (tmp_path / "label.nii.gz").write_bytes(answer.content)
        label = nib.load(str(tmp_path / "label.nii.gz"))
        assert label.shape == volume.shape
        np.testing.assert_allclose(label.affine, affine, atol=1e-5)
        labelled = np.asarray(label.dataobj)
        assert dice(labelled, mask) > MIN_PROPAGATED_DICE
        x0, y0, x1, y1 = (int(v) for v in box)
        assert labelled[:, :, 2][y0:y1 + 1, x0:x1 + 1].sum() == labelled[:, :, 2].sum()  # inside the box

        # 3D Slicer's ROI, IJK pairs in either order: its extent on axis 2 bounds the propagation.
        roi = [y1, y0, x0, x1, 3, 1]  # i = rows of an axial slice here, j = its columns
        answer = infer({"roi": roi})
        assert answer.status_code == 200, answer.text
        (tmp_path / "roi.nii.gz").write_bytes(answer.content)
        from_roi = np.asarray(nib.load(str(tmp_path / "roi.nii.gz")).dataobj)
        assert extent(from_roi, 2) == [1, 3] and dice(from_roi[:, :, 1:4], mask[:, :, 1:4]) > MIN_PROPAGATED_DICE

        cases = [
            ("no prompt", infer({}), 400, "needs a prompt"),
            ("box outside", infer({"box": [0, 0, volume.shape[1], 10], "slice": 2}), 422, "outside the slice"),
            ("slice outside", infer({"box": box, "slice": 5}), 422, "lies outside the volume"),
            ("bad axis", infer({"box": box, "slice": 2, "axis": 3}), 400, "axis must be"),
            ("point outside", infer({"foreground": [[10, 10, 5]]}), 422, "lies outside"),
            ("two channels", infer({"box": box, "slice": 2}, image="two_channels"), 422, "single-channel"),
        ]
        for what, answer, status, message in cases:
            assert answer.status_code == status, f"{what}: {answer.status_code} {answer.text}"
            assert message in answer.json()["detail"], f"{what}: {answer.text}"
