"""Data-fraction splits: a fixed test set and, per fraction and fold, a small training subset.

The protocol (DKA paper, below-100 % experiments):

- one fixed test set, stratified by class, drawn once for a seed (or given);
- one fixed validation set from the rest, for choosing checkpoints (never the test set);
- for each fraction and fold, a training subset of the remaining pool, stratified by class
  with at least one image per class (a fraction that would give a class zero images is
  bumped to one);
- a fraction that does not train on the share it names (raised to one image for some classes,
  or as many images as another fraction) is announced as a warning with its real count and
  share and the classes by name; every fraction record holds what it really is:
  ``train_counts`` (per fold), ``actual_fraction`` (mean share of the pool),
  ``bumped_classes`` (names) and ``same_count_as`` (the fractions with the same counts);
- sampling is by group (BraTS case, ISIC 2019 lesion, BUSI image), so no group is on both
  sides; images with identical content (by SHA-1 of the file bytes) are joined into one
  group, so a duplicated image cannot straddle train and test either;
- folds of one fraction are disjoint while the pool allows, then wrap around;
- every draw comes from a generator seeded by (seed, fraction, fold): the same seed gives
  the same split, adding a fraction leaves the others unchanged.

The JSON holds datalists with paths relative to its ``root``; `load_split` returns them with
absolute paths, ready for ``train#dataset#data`` in a bundle. Training subsets are drawn from
the pool without the validation set, so a checkpoint is chosen on images it was not trained
on and the test set is only ever used for the final report. In a bundle::

    "imports": ["$import medadapt.data"],
    "splits_json": "splits.json", "fraction": 0.0063, "fold": 0,
    "train#dataset#data": "$medadapt.data.load_split(@splits_json, @fraction, @fold, 'train')",
    "validate#dataset#data": "$medadapt.data.load_split(@splits_json, part='val')"
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medadapt.data.errors import DatasetError
from medadapt.io import atomic_write_text, read_json

logger = logging.getLogger("medadapt")

FORMAT = "medadapt-splits/1"
PATH_KEYS = ("image", "label")


# ---------------------------------------------------------------------------- public API
def make_splits(
    datalist: Sequence[dict],
    fractions: Sequence[float],
    folds: int = 5,
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    group_key: str = "group",
    label_key: str | None = None,
    root: str | os.PathLike | None = None,
    duplicates: str = "group",
    classes: Sequence[str] | None = None,
    dataset: str | None = None,
    test: Sequence[dict] | None = None,
) -> dict:
    """Split ``datalist`` into a fixed test set, a validation set and per-(fraction, fold)
    training subsets.

    Arguments:
        datalist: entries with "image" paths; ``group_key`` and ``label_key`` as below.
        fractions: fractions of the non-test pool to train on, each in (0, 1].
        folds: training subsets drawn per fraction.
        seed: seed of every random draw.
        test_fraction: share of each class's images held out as the fixed test set, in (0, 1).
        val_fraction: share of each class's remaining images held out as the validation
            set, in [0, 1) (at least one group per class when the class has two or more).
        group_key: entries sharing this value always land on the same side (patient, lesion,
            case). Entries without it are their own group.
        label_key: class key to stratify by (e.g. "class"); None for segmentation datasets
            without classes.
        root: folder the JSON paths are made relative to (default: the common folder of all
            image paths).
        duplicates: what to do with images of identical content: "group" joins them into one
            group and records them in the JSON; "raise" raises naming the files.
        classes: class names, stored in the JSON for readers.
        dataset: dataset name, stored in the JSON.
        test: a test set fixed by the dataset's design (entries not in ``datalist``); then
            ``test_fraction`` is not used and ``datalist`` is the whole pool.

    Returns the JSON-ready dict (see `save_splits`).
    """
    fractions = _check_arguments(datalist, fractions, folds, test_fraction, val_fraction, duplicates)
    fixed_test = [dict(e) for e in test] if test is not None else None
    entries = sorted((dict(e) for e in list(datalist) + (fixed_test or [])),
                     key=lambda e: (str(e.get(group_key, "")), _first_image(e)))
    root = Path(root).expanduser().resolve() if root is not None else _common_root(entries)

    # Groups: the given key, joined through identical content.
    hashes = [content_hash(e["image"]) for e in entries]
    base_groups = [str(e.get(group_key, _first_image(e))) for e in entries]
    groups, duplicate_sets = _join_duplicates(base_groups, hashes, entries, root)
    if duplicate_sets and duplicates == "raise":
        listing = "; ".join(" == ".join(d) for d in duplicate_sets[:10])
        raise DatasetError(f"{len(duplicate_sets)} set(s) of identical images found: {listing}")
    if label_key is not None:
        _check_duplicate_labels(entries, hashes, label_key, root)
    strata = _group_strata(entries, groups, label_key)

    if fixed_test is None:
        test_groups, notes = _draw_test(strata, groups, test_fraction, np.random.default_rng([seed, 0]))
    else:
        fixed = {_image_key(e) for e in fixed_test}
        test_groups = {g for e, g in zip(entries, groups) if _image_key(e) in fixed}
        notes = [f"the test set ({len(fixed_test)} samples) is fixed by the dataset"]
    remaining = {s: [g for g in gs if g not in test_groups] for s, gs in strata.items()}
    val_groups, val_notes = set(), []
    if val_fraction > 0:
        val_groups, val_notes = _draw_test(remaining, groups, val_fraction, np.random.default_rng([seed, 2]))
        notes += [n.replace("absent from the test set", "absent from the validation set") for n in val_notes]
    pool_strata = {s: [g for g in gs if g not in val_groups] for s, gs in remaining.items()}
    sizes = Counter(groups)

    by_group = defaultdict(list)
    for entry, group in zip(entries, groups):
        by_group[group].append(entry)
    test = [e for g in sorted(test_groups) for e in by_group[g]]
    val = [e for g in sorted(val_groups) for e in by_group[g]]

    names = _class_names(classes)
    result_fractions = [_draw_fraction(f, folds, seed, pool_strata, sizes, by_group, names) for f in fractions]
    notes += [r["repeats"] for r in result_fractions if r["repeats"]]
    notes += announce_real_counts(result_fractions)

    splits = {
        "format": FORMAT,
        "dataset": dataset,
        "root": str(root),
        "seed": seed,
        "folds": folds,
        "test_fraction": None if fixed_test is not None else test_fraction,
        "val_fraction": val_fraction,
        "group_key": group_key,
        "label_key": label_key,
        "classes": list(classes) if classes is not None else None,
        "counts": _counts(entries, groups, test_groups, val_groups, label_key),
        "duplicates": duplicate_sets,
        "notes": notes,
        "test": [_relative(e, root) for e in test],
        "val": [_relative(e, root) for e in val],
        "fractions": [
            {**rec, "folds": [{**f, "train": [_relative(e, root) for e in f["train"]]} for f in rec["folds"]]}
            for rec in result_fractions
        ],
    }
    known = {_image_key(e): h for e, h in zip(entries, hashes)}
    check_no_leakage(splits, known_hashes=known)
    return splits


def save_splits(splits: dict, path: str | os.PathLike) -> Path:
    """Write ``splits`` as indented JSON to ``path`` (folders created); returns the path."""
    path = Path(path)
    # Through a temporary file: a full disk or a kill leaves the previous file, never a torn one.
    atomic_write_text(path, json.dumps(splits, indent=1))
    return path


def load_split(
    splits: str | os.PathLike | dict,
    fraction: float | None = None,
    fold: int = 0,
    part: str = "train",
    root: str | os.PathLike | None = None,
) -> list[dict]:
    """One datalist of a splits JSON, with absolute paths.

    Arguments:
        splits: path to the JSON written by ``medadapt split`` / `save_splits`, or its dict.
        fraction: the training fraction (matched to the stored one within 1e-9); needed for
            part "train".
        fold: fold index for part "train".
        part: "train", "val" (the validation set, for choosing checkpoints) or "test" (the
            fixed test set, for the final report).
        root: dataset folder to resolve paths against, if it moved since the JSON was
            written (default: the JSON's "root").
    """
    if not isinstance(splits, dict):
        path = splits
        splits = read_json(path)
        if not isinstance(splits, dict):
            raise ValueError(f"{path} is not a medadapt splits file (a JSON {type(splits).__name__}, not an object)")
    if splits.get("format") != FORMAT:
        raise ValueError(f"not a medadapt splits file (format {splits.get('format')!r}, expected {FORMAT!r})")
    base = Path(root) if root is not None else Path(splits["root"])
    if part == "val":
        if "val" not in splits:
            raise ValueError("the splits file has no validation set (it was made by an older medadapt, which "
                             "validated on the test set); make a new one with `medadapt split`")
        entries = splits["val"]
    elif part == "test":
        entries = splits["test"]
    elif part == "train":
        if fraction is None:
            raise ValueError("fraction is required for part='train'")
        record = fraction_record(splits, fraction)
        if not 0 <= fold < len(record["folds"]):
            raise KeyError(f"fold {fold} not in the splits file; it has folds 0..{len(record['folds']) - 1}")
        entries = record["folds"][fold]["train"]
    else:
        raise ValueError(f"part must be 'train', 'val' or 'test', got {part!r}")
    return [_absolute(e, base) for e in entries]


def fraction_record(splits: dict, fraction: float) -> dict:
    """The record of ``fraction`` in a splits dict (matched within 1e-9), or a KeyError naming
    the fractions it has."""
    record = next((r for r in splits["fractions"] if math.isclose(r["fraction"], float(fraction), abs_tol=1e-9)), None)
    if record is None:
        raise KeyError(f"fraction {fraction} not in the splits file; it has {[r['fraction'] for r in splits['fractions']]}")
    if "bumped_classes" not in record:   # a file written before the names were recorded
        names = _class_names(splits.get("classes"))
        record = {**record, "bumped_classes": [names.get(s, s) for s in record.get("bumped", [])]}
    return record


def content_hash(paths: str | Sequence[str]) -> str:
    """SHA-1 of the bytes of one file, or of several files in order (a multi-modal case)."""
    digest = hashlib.sha1()
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_no_leakage(splits: dict, known_hashes: dict | None = None) -> None:
    """Raise if any group or any image content is in two of: a training subset, the
    validation set, the test set.

    `make_splits` calls it on its own result; call it on a JSON edited by hand.

    Arguments:
        splits: the splits dict.
        known_hashes: content hashes already computed, keyed by the tuple of absolute image
            paths, so that no file is read twice.
    """
    root = Path(splits["root"])
    key = splits.get("group_key") or "group"
    memo = dict(known_hashes or {})

    def digest(entry: dict) -> str:
        paths = _image_key(_absolute(entry, root))
        if paths not in memo:
            memo[paths] = content_hash(list(paths))
        return memo[paths]

    held_out = {part: splits.get(part) or [] for part in ("test", "val")}
    groups = {part: {str(e.get(key, e["image"])) for e in entries} for part, entries in held_out.items()}
    hashes = {part: {digest(e) for e in entries} for part, entries in held_out.items()}
    for entry in held_out["val"]:
        where = f"validation: {entry.get('case', entry['image'])}"
        if str(entry.get(key, entry["image"])) in groups["test"]:
            raise DatasetError(f"{where} is in the validation set and its group is in the test set")
        if digest(entry) in hashes["test"]:
            raise DatasetError(f"{where} has the same content as an image of the test set")
    for record in splits["fractions"]:
        for fold in record["folds"]:
            for entry in fold["train"]:
                group = str(entry.get(key, entry["image"]))
                where = f"fraction {record['fraction']} fold {fold['fold']}: {entry.get('case', entry['image'])}"
                for part, name in (("test", "test set"), ("val", "validation set")):
                    if group in groups[part]:
                        raise DatasetError(f"{where} is in training and its group {group!r} is in the {name}")
                    if digest(entry) in hashes[part]:
                        raise DatasetError(f"{where} has the same content as an image of the {name}")


def split_summary(splits: dict) -> str:
    """A table of the absolute training counts per fraction and fold, for printing."""
    counts = splits["counts"]
    lines = [
        f"{splits.get('dataset') or 'dataset'}: {counts['total']} images, test {counts['test']}, "
        f"validation {counts.get('val', 0)}, pool {counts['pool']}"
        f", seed {splits['seed']}"
    ]
    for record in splits["fractions"]:
        per_fold = ", ".join(str(f["count"]) for f in record["folds"])
        raised = record.get("bumped_classes", record["bumped"])
        bumped = f" (raised to 1 image: {', '.join(map(str, raised))})" if raised else ""
        actual = record.get("actual_fraction")
        share = f" (actual {percent(actual)} of the pool)" if actual is not None else ""
        lines.append(f"  fraction {record['fraction']:g}{share}: train images per fold [{per_fold}]{bumped}")
    if splits["duplicates"]:
        lines.append(f"  {len(splits['duplicates'])} set(s) of identical images kept in one group each")
    lines += [f"  note: {n}" for n in splits["notes"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- internals
def check_fractions(fractions) -> list[float]:
    """``fractions`` as floats, each in (0, 1] and none repeated, or an error naming ``--fractions``."""
    if not fractions:
        raise ValueError("fractions (--fractions): give at least one fraction in (0, 1]")
    checked = []
    for f in fractions:
        try:
            value = float(f)
        except (TypeError, ValueError):
            raise ValueError(f"fractions (--fractions): {f!r} is not a number") from None
        if math.isnan(value) or not 0.0 < value <= 1.0:
            raise ValueError(f"fractions (--fractions): {f} is not in (0, 1]; a fraction is the share of the training pool")
        checked.append(value)
    if len(set(checked)) != len(checked):
        raise ValueError(f"fractions (--fractions): {checked} repeats a value")
    return checked


def _check_arguments(datalist, fractions, folds, test_fraction, val_fraction, duplicates) -> list[float]:
    if not datalist:
        raise DatasetError("cannot split an empty datalist: no cases were found")
    checked = check_fractions(fractions)
    if int(folds) < 1:
        raise ValueError(f"folds (--folds) must be at least 1, got {folds}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction (--test-fraction) must be in (0, 1), got {test_fraction}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction (--val-fraction) must be in [0, 1), got {val_fraction}")
    if duplicates not in ("group", "raise"):
        raise ValueError(f"duplicates (--duplicates) must be 'group' or 'raise', got {duplicates!r}")
    return checked


def _first_image(entry: dict) -> str:
    image = entry["image"]
    return str(image[0] if isinstance(image, (list, tuple)) else image)


def _join_duplicates(groups, hashes, entries, root) -> tuple[list[str], list[list[str]]]:
    """Union of groups linked by identical content; also the sets of identical images."""
    parent = {g: g for g in groups}

    def find(g):
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    by_hash = defaultdict(list)
    for index, h in enumerate(hashes):
        by_hash[h].append(index)
    duplicate_sets = []
    for indices in by_hash.values():
        if len(indices) < 2:
            continue
        duplicate_sets.append([os.path.relpath(_first_image(entries[i]), root) for i in indices])
        for i in indices[1:]:
            a, b = find(groups[indices[0]]), find(groups[i])
            if a != b:
                parent[max(a, b)] = min(a, b)  # keep the smaller id so the result is order-free
    return [find(g) for g in groups], duplicate_sets


def _check_duplicate_labels(entries, hashes, label_key, root) -> None:
    """Identical images must not carry different classes: one of the two labels is wrong, and
    grouping them would hide it."""
    labels = defaultdict(dict)
    for entry, digest in zip(entries, hashes):
        labels[digest][os.path.relpath(_first_image(entry), root)] = entry.get(label_key)
    conflicts = [files for files in labels.values() if len(set(map(str, files.values()))) > 1]
    if conflicts:
        listing = "; ".join(", ".join(f"{name} ({label_key} {value})" for name, value in files.items())
                            for files in conflicts[:10])
        raise DatasetError(f"{len(conflicts)} image(s) appear with different classes (identical content): {listing}")


def _group_strata(entries, groups, label_key) -> dict:
    """Groups per class (the most common class of a group's images; ties to the smallest)."""
    if label_key is None:
        return {"all": sorted(set(groups))}
    labels = defaultdict(Counter)
    for index, (entry, group) in enumerate(zip(entries, groups)):
        if label_key not in entry:
            raise DatasetError(f"case {entry.get('case', index)}: no {label_key!r} to stratify by")
        labels[group][entry[label_key]] += 1
    strata = defaultdict(list)
    for group in sorted(labels):
        counts = labels[group]
        top = max(counts.values())
        strata[min(c for c, n in counts.items() if n == top)].append(group)
    return dict(sorted(strata.items(), key=lambda kv: str(kv[0])))


def _draw_test(strata, groups, test_fraction, rng) -> tuple[set, list[str]]:
    sizes = Counter(groups)
    test, notes = set(), []
    for stratum, members in strata.items():
        if len(members) < 2:
            notes.append(f"class {stratum} has a single group: it is kept for training and absent from the test set")
            continue
        order = [members[i] for i in rng.permutation(len(members))]
        target = max(1, _round(test_fraction * sum(sizes[g] for g in members)))
        taken = 0
        for group in order[:-1]:  # always leave one group of the class for training
            if taken >= target:
                break
            test.add(group)
            taken += sizes[group]
    return test, notes


def _draw_fraction(fraction, folds, seed, pool_strata, sizes, by_group, names=None) -> dict:
    """Training subsets of one fraction: per class a cyclic walk through shuffled groups;
    ``names`` maps a stratum to its class name (default: the stratum itself)."""
    rng = np.random.default_rng([seed, 1, _round(fraction * 1e9)])
    fold_groups = [[] for _ in range(folds)]
    targets, bumped = {}, []
    for stratum, members in pool_strata.items():
        if not members:
            continue
        order = [members[i] for i in rng.permutation(len(members))]
        available = sum(sizes[g] for g in order)
        target = _round(fraction * available)
        if target == 0:
            target = 1  # protocol: at least one image per class
            bumped.append(stratum)
        targets[str(stratum)] = target
        cursor = 0
        for k in range(folds):
            taken, used = 0, 0
            while taken < target and used < len(order):
                group = order[cursor % len(order)]
                fold_groups[k].append((stratum, group))
                taken += sizes[group]
                cursor += 1
                used += 1
    record_folds = []
    for k, chosen in enumerate(fold_groups):
        train = [e for _, g in sorted(chosen, key=lambda sg: (str(sg[0]), sg[1])) for e in by_group[g]]
        per_class = Counter()
        for stratum, group in chosen:
            per_class[str(stratum)] += sizes[group]
        record_folds.append({"fold": k, "count": len(train), "per_class": dict(sorted(per_class.items())), "train": train})
    pool = sum(sizes[g] for gs in pool_strata.values() for g in gs)
    for record in record_folds:
        record["actual_fraction"] = round(record["count"] / pool, 6) if pool else 0.0
    shared = sorted({k for k in range(folds) for j in range(k) if set(fold_groups[k]) & set(fold_groups[j])})
    repeats = None
    if shared and fraction < 1:
        # The cyclic walk ran out of unused groups: later folds reuse images of earlier ones
        # (at fraction 1 every fold is the whole pool by definition, nothing to warn about).
        repeats = (f"fraction {fraction:g}: the pool holds too few images for {folds} disjoint training subsets; "
                   f"fold(s) {', '.join(map(str, shared))} share images with earlier folds")
        logger.warning(repeats)
    counts = [record["count"] for record in record_folds]
    return {
        "fraction": fraction,
        "pool": pool,
        "repeats": repeats,
        "target_per_class": targets,
        "bumped": [str(s) for s in bumped],
        "bumped_classes": [(names or {}).get(str(s), str(s)) for s in bumped],
        "train_counts": counts,
        "actual_fraction": round(sum(counts) / len(counts) / pool, 6) if pool else 0.0,
        "same_count_as": [],
        "folds": record_folds,
    }


def _class_names(classes: Sequence[str] | None) -> dict[str, str]:
    """Stratum key (the class index as text) -> class name."""
    return {str(index): str(name) for index, name in enumerate(classes or [])}


def percent(share: float) -> str:
    """0.107142 -> "10.7 %", 0.0063 -> "0.63 %"."""
    return f"{100.0 * share:.3g} %"


def real_count_text(record: dict, unit: str = "images") -> str:
    """What a fraction record really trains on: "3 images (10.7 % of the pool's 28)" (a
    range of counts where folds differ)."""
    # Files written before these keys existed hold the per-fold counts only.
    counts = record.get("train_counts") or [fold["count"] for fold in record["folds"]]
    count = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
    share = record.get("actual_fraction", sum(counts) / len(counts) / max(record["pool"], 1))
    return f"{count} {unit} ({percent(share)} of the pool's {record['pool']})"


def real_count_notes(record: dict, unit: str = "images") -> list[str]:
    """What to say about a fraction record that does not train on the share it names: the
    classes raised to one image (by name), and the fractions that train on as many images."""
    notes = []
    raised = [name for name in record.get("bumped_classes", []) if name != "all"]
    if record.get("bumped"):
        where = f" for {', '.join(raised)}" if raised else ""
        notes.append(f"fraction {record['fraction']:g} ({percent(record['fraction'])} requested) trains on "
                     f"{real_count_text(record, unit)}: raised to 1 image{where}, whose share rounds to 0")
    if record.get("same_count_as"):
        others = ", ".join(f"{f:g}" for f in record["same_count_as"])
        notes.append(f"fraction {record['fraction']:g} trains on {real_count_text(record, unit)}, as many as fraction(s) "
                     f"{others}: their results differ by the images drawn, not by how many")
    return notes


def announce_real_counts(records: list[dict]) -> list[str]:
    """Record in each fraction record the fractions with the same training counts
    (``same_count_as``), warn about every fraction that does not train on the share it
    names, and return the warnings (for the splits' notes)."""
    for record in records:
        record["same_count_as"] = [other["fraction"] for other in records
                                   if other is not record and other["train_counts"] == record["train_counts"]]
    notes = [note for record in records for note in real_count_notes(record)]
    for note in notes:
        logger.warning(note)
    return notes


def _counts(entries, groups, test_groups, val_groups, label_key) -> dict:
    part = ["test" if g in test_groups else "val" if g in val_groups else "pool" for g in groups]
    counts = {"total": len(entries), "test": part.count("test"), "val": part.count("val"), "pool": part.count("pool"),
              "groups": len(set(groups))}
    if label_key is not None:
        per_class = defaultdict(lambda: {"total": 0, "test": 0, "val": 0, "pool": 0})
        for entry, where in zip(entries, part):
            row = per_class[str(entry[label_key])]
            row["total"] += 1
            row[where] += 1
        counts["per_class"] = dict(sorted(per_class.items()))
    return counts


def _round(x: float) -> int:
    """Round half up (Python's round() sends 0.5 to 0 and 2.5 to 2)."""
    return int(math.floor(x + 0.5))


def _common_root(entries) -> Path:
    paths = [os.path.abspath(p) for e in entries for p in _paths(e)]
    return Path(os.path.commonpath([os.path.dirname(p) for p in paths]))


def _image_key(entry: dict) -> tuple[str, ...]:
    """The absolute image path(s) of an entry, as a hashable key."""
    image = entry["image"]
    return tuple(os.path.abspath(p) for p in (image if isinstance(image, (list, tuple)) else [image]))


def _paths(entry) -> list[str]:
    out = []
    for key in PATH_KEYS:
        value = entry.get(key)
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out += [v for v in value if isinstance(v, str)]
    return out


def _map_paths(entry: dict, fn) -> dict:
    out = dict(entry)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str):
            out[key] = fn(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            out[key] = [fn(v) for v in value]
    return out


def _relative(entry: dict, root: Path) -> dict:
    return _map_paths(entry, lambda p: os.path.relpath(os.path.abspath(p), root))


def _absolute(entry: dict, root: Path) -> dict:
    return _map_paths(entry, lambda p: p if os.path.isabs(p) else os.path.normpath(os.path.join(root, p)))
