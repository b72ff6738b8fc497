"""BraTS label conventions per release and their conversion to TC / WT / ET channels.

The releases disagree on what the label values mean:

=========  ============================================  =========  ==========  =====
release    values                                         TC         WT          ET
=========  ============================================  =========  ==========  =====
2021       1 necrotic core, 2 edema, 4 enhancing          1 | 4      1 | 2 | 4   4
           (same for 2018, 2019, 2020)
2023       1 necrotic core (NETC), 2 edema (SNFH),        1 | 3      1 | 2 | 3   3
           3 enhancing (GLI; also MEN, MET, PED, SSA)
msd        1 edema, 2 non-enhancing tumour,               2 | 3      1 | 2 | 3   3
           3 enhancing (MSD Task01_BrainTumour)
=========  ============================================  =========  ==========  =====

Reading a label map with the wrong release silently empties a channel (a 2021 reader looks
for ET = 4 in 2023 data and finds nothing), so the conversion checks the values it sees and
raises an error naming the file; 2023 and MSD share the value set {1, 2, 3}, so between those
two the file name is checked instead.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from medadapt.data.errors import DatasetError


@dataclass(frozen=True)
class BraTSRelease:
    """The label convention of one BraTS release.

    Arguments:
        name: canonical release name ("2021", "2023" or "msd").
        values: the foreground label values the release uses.
        tc: values forming the tumour core.
        wt: values forming the whole tumour.
        et: values forming the enhancing tumour.
        meaning: what each value stands for, for messages and documentation.
    """

    name: str
    values: tuple[int, ...]
    tc: tuple[int, ...]
    wt: tuple[int, ...]
    et: tuple[int, ...]
    meaning: Mapping[int, str]


RELEASES: dict[str, BraTSRelease] = {
    "2021": BraTSRelease(
        "2021", (1, 2, 4), tc=(1, 4), wt=(1, 2, 4), et=(4,),
        meaning={1: "necrotic tumour core", 2: "peritumoral edema", 4: "enhancing tumour"},
    ),
    "2023": BraTSRelease(
        "2023", (1, 2, 3), tc=(1, 3), wt=(1, 2, 3), et=(3,),
        meaning={1: "non-enhancing tumour core", 2: "surrounding FLAIR hyperintensity", 3: "enhancing tumour"},
    ),
    "msd": BraTSRelease(
        "msd", (1, 2, 3), tc=(2, 3), wt=(1, 2, 3), et=(3,),
        meaning={1: "edema", 2: "non-enhancing tumour", 3: "enhancing tumour"},
    ),
}

# Other spellings users write; 2018-2020 share the 2021 labels.
_ALIASES = {
    "2018": "2021", "2019": "2021", "2020": "2021", "2018-2021": "2021", "brats2021": "2021",
    "2023-gli": "2023", "gli": "2023", "brats2023": "2023",
    "task01": "msd", "task01_braintumour": "msd", "msd-task01": "msd",
}

# File-name patterns that identify a release; used by auto-detection and, because 2023 and
# MSD share label values, to catch a 2023 file read as MSD (or the reverse).
_NAME_PATTERNS = [
    ("2023", re.compile(r"BraTS-[A-Z]+-\d+-\d+")),
    ("msd", re.compile(r"^BRATS_\d+")),
    ("2021", re.compile(r"^(BraTS2021_\d+|BraTS20_(Training|Validation)_\d+|Brats18_|BraTS19_)")),
]


def canonical_release(release: str) -> str:
    """Canonical name of ``release`` ("2021", "2023" or "msd"); raises on an unknown name."""
    key = str(release).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in RELEASES:
        raise ValueError(
            f"unknown BraTS release {release!r}; use one of {sorted(RELEASES)} "
            f"(aliases: {sorted(_ALIASES)}) or 'auto'"
        )
    return key


def release_from_name(name: str) -> str | None:
    """The release a case or file name belongs to, or None if the name does not tell."""
    base = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    for release, pattern in _NAME_PATTERNS:
        if pattern.search(base):
            return release
    return None


def describe_source(case: str | None, filename: str | None) -> str:
    """"case X (file)" for error messages, leaving out what is unknown."""
    parts = [f"case {case}" if case else "", f"({filename})" if filename else ""]
    return " ".join(p for p in parts if p) or "<unnamed>"


def check_label_values(
    values: Sequence[float], release: str, case: str | None = None, filename: str | None = None
) -> None:
    """Raise if the label ``values`` found in one label map do not fit ``release``.

    Arguments:
        values: the distinct values present in the label map.
        release: canonical release name.
        case: case id, quoted in the error.
        filename: label file, quoted in the error and checked against the release's naming.
    """
    spec = RELEASES[release]
    source = describe_source(case, filename)
    found = sorted(float(v) for v in values)
    not_integer = [v for v in found if v != int(v)]
    if not_integer:
        raise DatasetError(
            f"BraTS label map {source}: non-integer label values {not_integer}; "
            "a label map must hold integer classes (was it resampled with linear interpolation?)"
        )
    found_int = sorted(int(v) for v in found)
    unexpected = [v for v in found_int if v != 0 and v not in spec.values]
    if unexpected:
        fits = [r for r, s in RELEASES.items() if set(found_int) - {0} <= set(s.values)]
        hint = f"; these values fit release(s) {fits}" if fits else ""
        raise DatasetError(
            f"BraTS label map {source}: release {release!r} expects label values "
            f"{[0, *spec.values]} but found {found_int}; unexpected value(s) {unexpected}{hint}. "
            "Set the release to match the data (reading it as this release would leave "
            "tumour channels empty)."
        )
    named = release_from_name(filename) if filename else None
    if named is not None and named != release and set(RELEASES[named].values) == set(spec.values):
        raise DatasetError(
            f"BraTS label map {source}: the file name follows release {named!r} but the "
            f"labels are being read as release {release!r}; both use values {list(spec.values)} "
            f"with different meanings ({dict(RELEASES[named].meaning)} vs {dict(spec.meaning)})."
        )


class ConvertBraTSLabels(Transform):
    """Convert a BraTS label map to three channels: tumour core, whole tumour, enhancing tumour.

    Arguments:
        release: "2021" (also 2018-2020), "2023" (GLI and the other 2023 challenges), "msd"
            (Task01_BrainTumour), or "auto" to tell the release from the file name.

    Input: a label map of shape (H, W, D) or (1, H, W, D). Output: float32 of shape
    (3, H, W, D), channels in MONAI's order (TC, WT, ET).
    """

    def __init__(self, release: str = "2021") -> None:
        self.release = "auto" if str(release).lower() == "auto" else canonical_release(release)

    def __call__(self, label: torch.Tensor | np.ndarray, case: str | None = None) -> torch.Tensor | np.ndarray:
        """Arguments:
        label: the label map (a MetaTensor from LoadImage carries its file name).
        case: case id used in error messages.
        """
        filename = _filename(label)
        source = describe_source(case, filename)
        release = self.release
        if release == "auto":
            release = release_from_name(filename) if filename else None
            if release is None:
                raise DatasetError(
                    f"BraTS label map {source}: cannot tell the release from the "
                    "file name; set release to '2021', '2023' or 'msd'"
                )
        spec = RELEASES[release]
        if label.ndim == 4 and label.shape[0] == 1:
            label = label[0]
        if label.ndim != 3:
            raise DatasetError(
                f"BraTS label map {source}: expected a single-channel 3D label map, got shape {tuple(label.shape)}"
            )
        values = torch.unique(label) if isinstance(label, torch.Tensor) else np.unique(label)
        check_label_values([float(v) for v in values], release, case, filename)
        channels = [_isin(label, group) for group in (spec.tc, spec.wt, spec.et)]
        if isinstance(label, torch.Tensor):
            return torch.stack(channels, dim=0).to(torch.float32)
        return np.stack(channels, axis=0).astype(np.float32)


class ConvertBraTSLabelsd(MapTransform):
    """Dictionary form of `ConvertBraTSLabels`; errors name the entry's ``case`` and file.

    Arguments:
        keys: keys of the label maps to convert (usually "label").
        release: see `ConvertBraTSLabels`.
        allow_missing_keys: do not raise if a key is absent (e.g. inference without labels).
    """

    def __init__(self, keys: KeysCollection, release: str = "2021", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = ConvertBraTSLabels(release)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            case = d.get("case")
            d[key] = self.converter(d[key], case=str(case) if case is not None else None)
        return d


def _isin(label, values: tuple[int, ...]):
    if isinstance(label, torch.Tensor):
        return torch.isin(label, torch.tensor(values, dtype=label.dtype, device=label.device))
    return np.isin(label, values)


def _filename(x) -> str:
    meta = getattr(x, "meta", None)
    if isinstance(meta, Mapping):
        name = meta.get("filename_or_obj")
        if name:
            return str(name)
    return ""
