"""Data-fraction splits: protocol properties, determinism, leakage, duplicates, CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from fixtures_data import make_brats2021, make_busi, make_isic2019, tiny_files_datalist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medadapt.cli import main
from medadapt.data.errors import DatasetError
from medadapt.data.splits import check_no_leakage, load_split, make_splits
from medadapt.datasets.brats import brats_datalist


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _assert_protocol(splits: dict, datalist: list[dict], label_key: str | None) -> None:
    """The properties every split must have, whatever the data."""
    group_of = {e["case"]: e["group"] for e in datalist}
    label_of = {e["case"]: e.get(label_key) for e in datalist}
    test_cases = {e["case"] for e in splits["test"]}
    val_cases = {e["case"] for e in splits["val"]}
    assert not test_cases & val_cases
    test_groups = {group_of[c] for c in test_cases | val_cases}  # neither may meet training
    assert not {group_of[c] for c in test_cases} & {group_of[c] for c in val_cases}
    pool = [e for e in datalist if e["case"] not in test_cases | val_cases]
    pool_per_class = Counter(label_of[e["case"]] for e in pool)
    assert splits["counts"]["test"] == len(test_cases) and splits["counts"]["pool"] == len(pool)
    assert splits["counts"]["val"] == len(val_cases)
    for record in splits["fractions"]:
        assert record["pool"] == len(pool)
        for fold in record["folds"]:
            cases = [e["case"] for e in fold["train"]]
            assert len(cases) == len(set(cases)) == fold["count"]  # no repeats inside a fold
            assert not {group_of[c] for c in cases} & test_groups  # grouped: no leakage
            per_class = Counter(label_of[c] for c in cases)
            assert set(per_class) == set(pool_per_class)  # at least one image of every class
            for cls, n in per_class.items():
                target = max(1, _round_half_up(record["fraction"] * pool_per_class[cls]))
                assert n >= target  # groups may overshoot by the rest of a group
                assert fold["per_class"]["all" if label_key is None else str(cls)] == n
            groups = {group_of[c] for c in cases}
            members = [e["case"] for e in datalist if e["group"] in groups]
            assert sorted(members) == sorted(cases)  # whole groups only


# ---------------------------------------------------------------------------- protocol
def test_counts_stratification_and_minimum_per_class(tmp_path):
    classes = [0] * 50 + [1] * 30 + [2] * 8
    datalist = tiny_files_datalist(tmp_path, classes)
    splits = make_splits(datalist, [0.0063, 0.05, 0.5, 1.0], folds=5, seed=0, label_key="class")
    _assert_protocol(splits, datalist, "class")
    test_classes = Counter(e["class"] for e in splits["test"])
    for cls, n in Counter(classes).items():
        assert test_classes[cls] == _round_half_up(0.2 * n)  # stratified fixed test set
    val_classes = Counter(e["class"] for e in splits["val"])
    pool = {cls: n - test_classes[cls] - val_classes[cls] for cls, n in Counter(classes).items()}
    for cls, n in Counter(classes).items():  # stratified validation set from what the test set left
        assert val_classes[cls] == max(1, _round_half_up(0.1 * (n - test_classes[cls])))
    for record in splits["fractions"]:
        for fold in record["folds"]:
            for cls, n in pool.items():  # single-image groups: exact counts
                assert fold["per_class"][str(cls)] == max(1, _round_half_up(record["fraction"] * n))
    tiny = splits["fractions"][0]
    assert sorted(tiny["bumped"]) == ["0", "1", "2"]  # 0.63 % of 36/22/5 rounds to 0: bumped to 1
    assert all(f["count"] == 3 for f in tiny["folds"])
    full = splits["fractions"][-1]
    assert all(f["count"] == len(datalist) - len(splits["test"]) - len(splits["val"]) for f in full["folds"])


def test_validation_set_is_never_the_test_set_and_a_fixed_test_set_is_kept(tmp_path):
    classes = [0] * 20 + [1] * 10
    datalist = tiny_files_datalist(tmp_path, classes)
    splits = make_splits(datalist, [0.5], folds=2, seed=0, label_key="class", val_fraction=0.2)
    val, test = load_split(splits, part="val"), load_split(splits, part="test")
    assert val and test and not {e["image"] for e in val} & {e["image"] for e in test}
    assert Counter(e["class"] for e in val) == {0: 3, 1: 2}
    # A test set fixed by the dataset's design stays exactly as given.
    fixed, pool = datalist[:5], datalist[5:]
    splits = make_splits(pool, [1.0], folds=1, seed=0, label_key="class", test=fixed)
    assert sorted(e["case"] for e in splits["test"]) == sorted(e["case"] for e in fixed)
    assert splits["counts"]["total"] == len(datalist)
    _assert_protocol(splits, datalist, "class")
    # A splits file from before validation sets existed is refused, not read as the test set.
    del splits["val"]
    with pytest.raises(ValueError, match="no validation set"):
        load_split(splits, part="val")
    with pytest.raises(ValueError, match="val_fraction"):
        make_splits(datalist, [0.5], val_fraction=1.0)


def test_folds_disjoint_while_pool_allows(tmp_path):
    datalist = tiny_files_datalist(tmp_path, [0] * 50 + [1] * 50)
    splits = make_splits(datalist, [0.1], folds=5, seed=3, label_key="class", val_fraction=0)
    folds = [{e["case"] for e in f["train"]} for f in splits["fractions"][0]["folds"]]
    assert all(len(f) == 8 for f in folds)  # 10 % of 40 per class
    assert len(set().union(*folds)) == sum(len(f) for f in folds)  # 5 x 8 <= 80: no overlap
    wrap = make_splits(datalist, [0.4], folds=5, seed=3, label_key="class", val_fraction=0)
    folds = [{e["case"] for e in f["train"]} for f in wrap["fractions"][0]["folds"]]
    assert all(len(f) == 32 for f in folds) and len(set().union(*folds)) == 80  # wraps, covers all


def test_deterministic_and_seed_dependent(tmp_path):
    datalist = tiny_files_datalist(tmp_path, [0] * 20 + [1] * 20)
    a = make_splits(datalist, [0.1, 1.0], folds=3, seed=0, label_key="class")
    b = make_splits(list(reversed(datalist)), [0.1, 1.0], folds=3, seed=0, label_key="class")
    c = make_splits(datalist, [0.1, 1.0], folds=3, seed=1, label_key="class")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # input order irrelevant
    assert a["test"] != c["test"] or a["fractions"][0]["folds"] != c["fractions"][0]["folds"]
    more = make_splits(datalist, [0.05, 0.1, 1.0], folds=3, seed=0, label_key="class")
    # Adding a fraction leaves the others' draws alone (it may only become their twin in count).
    def drawn(record: dict) -> dict:
        return {k: v for k, v in record.items() if k != "same_count_as"}

    assert drawn(more["fractions"][1]) == drawn(a["fractions"][0])
    assert more["test"] == a["test"]


def test_groups_never_straddle(tmp_path):
    classes = [i % 3 for i in range(60)]
    groups = [f"patient{i // 3}" for i in range(60)]  # 3 images per patient, mixed classes
    datalist = tiny_files_datalist(tmp_path, classes, groups)
    splits = make_splits(datalist, [0.1, 0.5], folds=4, seed=0, label_key="class")
    test_groups = {e["group"] for e in splits["test"]}
    for record in splits["fractions"]:
        for fold in record["folds"]:
            assert not {e["group"] for e in fold["train"]} & test_groups
            per_group = Counter(e["group"] for e in fold["train"])
            assert set(per_group.values()) == {3}  # whole patients only


def test_unstratified_segmentation_grouped_by_case(tmp_path):
    make_brats2021(tmp_path, cases=10)
    datalist = brats_datalist(tmp_path)
    splits = make_splits(datalist, [0.0063, 0.5], folds=3, seed=0, root=tmp_path)
    _assert_protocol(splits, datalist, None)
    assert len(splits["test"]) == 2
    assert [f["count"] for f in splits["fractions"][0]["folds"]] == [1, 1, 1]
    assert [f["count"] for f in splits["fractions"][1]["folds"]] == [4, 4, 4]
    assert all(not os.path.isabs(p) for p in splits["test"][0]["image"])  # relative in the JSON


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(min_value=2, max_value=30), min_size=1, max_size=4),
    fractions=st.lists(st.floats(min_value=0.001, max_value=1.0), min_size=1, max_size=3, unique=True),
    folds=st.integers(min_value=1, max_value=4),
    seed=st.integers(min_value=0, max_value=10_000),
    group_size=st.integers(min_value=1, max_value=3),
)
def test_protocol_holds_for_any_class_sizes(sizes, fractions, folds, seed, group_size):
    classes = [c for c, n in enumerate(sizes) for _ in range(n)]
    groups = [f"g{c}_{i // group_size}" for c, n in enumerate(sizes) for i in range(n)]
    with tempfile.TemporaryDirectory() as folder:
        datalist = tiny_files_datalist(Path(folder), classes, groups)
        splits = make_splits(datalist, fractions, folds=folds, seed=seed, label_key="class")
        _assert_protocol(splits, datalist, "class")
        # Every class with two or more groups is represented in the test set.
        multi = {c for c in set(classes) if len({g for g, k in zip(groups, classes) if k == c}) > 1}
        assert multi <= {e["class"] for e in splits["test"]}


# ---------------------------------------------------------------------------- duplicates
def test_duplicate_images_grouped_or_raised(tmp_path):
    datalist = tiny_files_datalist(tmp_path, [0] * 10 + [1] * 10)
    shutil.copyfile(datalist[3]["image"], datalist[5]["image"])  # the same picture twice
    for seed in range(5):
        splits = make_splits(datalist, [0.3, 1.0], folds=3, seed=seed, label_key="class")
        assert len(splits["duplicates"]) == 1
        assert sorted(splits["duplicates"][0]) == ["img_0003.bin", "img_0005.bin"]
        for part in ("test", "val"):
            held = {e["case"] for e in splits[part]}
            assert ({"c3", "c5"} <= held) or not ({"c3", "c5"} & held)  # same side, always
    with pytest.raises(DatasetError) as error:
        make_splits(datalist, [0.3], folds=1, seed=0, label_key="class", duplicates="raise")
    assert "img_0003.bin" in str(error.value) and "img_0005.bin" in str(error.value)
    # The same picture under two classes: one label is wrong, and it is named, not grouped.
    shutil.copyfile(datalist[3]["image"], datalist[15]["image"])
    with pytest.raises(DatasetError, match=r"different classes.*img_0015.bin \(class 1\)"):
        make_splits(datalist, [0.3], folds=1, seed=0, label_key="class")


def test_folds_that_must_share_images_say_so(tmp_path, caplog):
    datalist = tiny_files_datalist(tmp_path, [0] * 6 + [1] * 6)
    splits = make_splits(datalist, [0.5], folds=4, seed=0, label_key="class", val_fraction=0)
    record = splits["fractions"][0]
    assert record["repeats"] and "fold(s)" in record["repeats"] and record["repeats"] in splits["notes"]
    assert "too few images for 4 disjoint training subsets" in caplog.text
    assert make_splits(datalist, [0.1], folds=2, seed=0, label_key="class", val_fraction=0)["fractions"][0]["repeats"] is None


def test_leakage_check_catches_edited_json(tmp_path):
    datalist = tiny_files_datalist(tmp_path, [0] * 10 + [1] * 10)
    splits = make_splits(datalist, [0.5], folds=1, seed=0, label_key="class")
    splits["fractions"][0]["folds"][0]["train"].append(dict(splits["test"][0]))
    with pytest.raises(DatasetError, match=splits["test"][0]["case"]):
        check_no_leakage(splits)


# ---------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_bad_fraction_names_the_option(tmp_path, bad):
    datalist = tiny_files_datalist(tmp_path, [0, 1, 0, 1])
    with pytest.raises(ValueError, match="--fractions"):
        make_splits(datalist, [0.5, bad], label_key="class")


def test_empty_datalist_and_other_arguments(tmp_path):
    with pytest.raises(DatasetError, match="empty"):
        make_splits([], [0.5])
    datalist = tiny_files_datalist(tmp_path, [0, 1, 0, 1])
    with pytest.raises(ValueError, match="--folds"):
        make_splits(datalist, [0.5], folds=0)
    with pytest.raises(ValueError, match="--test-fraction"):
        make_splits(datalist, [0.5], test_fraction=1.0)
    with pytest.raises(DatasetError, match="'class'"):
        make_splits([{k: v for k, v in e.items() if k != "class"} for e in datalist], [0.5], label_key="class")


# ---------------------------------------------------------------------------- JSON round trip and CLI
def test_load_split_parts(tmp_path):
    datalist = tiny_files_datalist(tmp_path / "data", [0] * 10 + [1] * 10)
    splits = make_splits(datalist, [0.25], folds=2, seed=0, label_key="class", root=tmp_path / "data")
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(splits))
    train = load_split(path, 0.25, fold=1, part="train")
    assert [e["case"] for e in train] == [e["case"] for e in splits["fractions"][0]["folds"][1]["train"]]
    assert all(os.path.isabs(e["image"]) and os.path.isfile(e["image"]) for e in train)
    val, test = load_split(path, part="val"), load_split(path, part="test")
    assert len(val) == 2 and len(test) == 4 and not {e["case"] for e in val} & {e["case"] for e in test}
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "data", moved)
    assert all(e["image"].startswith(str(moved)) for e in load_split(path, 0.25, 0, root=moved))
    with pytest.raises(KeyError, match="0.5"):
        load_split(path, 0.5, 0)
    with pytest.raises(KeyError, match="fold 2"):
        load_split(path, 0.25, 2)


def test_cli_split_busi(tmp_path, capsys):
    make_busi(tmp_path / "busi", per_class=6)
    out = tmp_path / "out" / "splits.json"
    code = main([
        "split", "--dataset", "busi", "--root", str(tmp_path / "busi"), "--fractions", "0.0063", "0.5", "1.0",
        "--folds", "3", "--seed", "0", "--out", str(out),
    ])
    assert code == 0 and out.is_file()
    splits = json.loads(out.read_text(encoding="utf-8"))
    assert splits["dataset"] == "busi" and splits["classes"] == ["benign", "malignant", "normal"]
    assert [r["fraction"] for r in splits["fractions"]] == [0.0063, 0.5, 1.0]
    train = load_split(out, 0.0063, fold=2)
    assert sorted(e["class"] for e in train) == [0, 1, 2]  # one per class, bumped
    assert all(os.path.isfile(e["image"]) for e in train)
    assert "wrote" in capsys.readouterr().out


def test_cli_split_isic2019_groups_lesions(tmp_path):
    classes = [i % 3 for i in range(24)]
    lesions = [f"L{i // 2}" for i in range(24)]  # two photos per lesion
    make_isic2019(tmp_path / "isic", classes, lesions)
    out = tmp_path / "splits.json"
    assert main(["split", "--dataset", "isic2019", "--root", str(tmp_path / "isic"), "--fractions", "0.5",
                 "--folds", "2", "--out", str(out)]) == 0
    splits = json.loads(out.read_text(encoding="utf-8"))
    test_lesions = {e["lesion_id"] for e in splits["test"]}
    for fold in splits["fractions"][0]["folds"]:
        assert not {e["lesion_id"] for e in fold["train"]} & test_lesions


def test_cli_errors_are_one_line(tmp_path, capsys):
    make_busi(tmp_path / "busi", per_class=2)
    code = main(["split", "--dataset", "busi", "--root", str(tmp_path / "busi"), "--fractions", "0",
                 "--out", str(tmp_path / "s.json")])
    assert code == 2 and "--fractions" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    code = main(["split", "--dataset", "brats", "--root", str(tmp_path / "empty"), "--fractions", "1.0",
                 "--out", str(tmp_path / "s.json")])
    assert code == 2 and "no BraTS layout" in capsys.readouterr().err
    os.remove(tmp_path / "busi" / "Dataset_BUSI_with_GT" / "benign" / "benign (1)_mask.png")
    code = main(["split", "--dataset", "busi", "--root", str(tmp_path / "busi"), "--fractions", "1.0",
                 "--out", str(tmp_path / "s.json")])
    assert code == 2 and "benign (1)" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


def test_the_whole_pool_in_every_fold_is_not_a_repeat_worth_a_warning(tmp_path, caplog):
    datalist = tiny_files_datalist(tmp_path, [0] * 6 + [1] * 6)
    splits = make_splits(datalist, [1.0], folds=5, seed=0, label_key="class", val_fraction=0)
    assert splits["fractions"][0]["repeats"] is None
    assert "disjoint training subsets" not in caplog.text


def test_validation_is_never_larger_than_the_training_subset():
    from medadapt.engine.data import limit_validation

    val = [{"image": f"v{i}.png"} for i in range(40)]
    assert limit_validation(val, 3, "train") == val[:3]  # 3 training images: 3 to choose the checkpoint
    assert limit_validation(val, 0, "train") == val[:1]  # at least one
    assert limit_validation(val, 100, "train") == val  # never more than there are
    assert limit_validation(val, 3, 10) == val[:10] and limit_validation(val, 3, None) == val
    with pytest.raises(ValueError, match="val_limit"):
        limit_validation(val, 3, "many")


def _split_under_file_size_limit(root: Path, out: Path, limit: int):
    """``medadapt split`` in a process that cannot write files past ``limit`` bytes: the
    writes fail as on a full disk (Python ignores SIGXFSZ, so they raise EFBIG)."""
    import resource
    import subprocess
    import sys

    command = [sys.executable, "-m", "medadapt", "split", "--dataset", "busi", "--root", str(root),
               "--fractions", "1.0", "--folds", "1", "--check", "none", "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, encoding="utf-8", timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))


def test_a_full_disk_leaves_the_previous_splits_file(tmp_path):
    make_busi(tmp_path / "busi", per_class=3)
    out = tmp_path / "splits.json"
    out.write_text('{"previous": true}', encoding="utf-8")
    result = _split_under_file_size_limit(tmp_path / "busi", out, 256)  # the new file is ~2 KB
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot write the splits file" in result.stderr and str(out) in result.stderr
    assert json.loads(out.read_text(encoding="utf-8")) == {"previous": True}  # not a 0-byte or torn file
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_a_splits_file_that_is_not_json_or_nests_too_deep_is_named(tmp_path):
    for text in ("[" * 100_000, "[1, 2]", "{nope"):
        path = tmp_path / "splits.json"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match="splits.json"):
            load_split(path, part="test")


# ---------------------------------------------------------------------------- fractions that are not what they say
def test_fractions_that_round_alike_or_are_raised_are_announced_by_class_name(tmp_path, caplog):
    # 15 / 10 / 5 images: a pool of 9 / 6 / 3 after the test and validation sets.
    datalist = tiny_files_datalist(tmp_path, [0] * 15 + [1] * 10 + [2] * 5)
    classes = ["benign", "malignant", "normal"]
    splits = make_splits(datalist, [0.0063, 0.0125, 1.0], folds=2, seed=0, label_key="class", classes=classes)
    tiny, small, full = splits["fractions"]
    pool = splits["counts"]["pool"]
    for record in (tiny, small):
        assert record["train_counts"] == [3, 3] and record["bumped_classes"] == classes
        assert record["actual_fraction"] == round(3 / pool, 6)
    assert tiny["same_count_as"] == [0.0125] and small["same_count_as"] == [0.0063] and full["same_count_as"] == []
    assert full["bumped_classes"] == [] and full["actual_fraction"] == 1.0
    share = f"{100 * 3 / pool:.3g} %"
    # Said on the console (as warnings) and kept in the file's notes, with names, count and share.
    for text in (caplog.text, "\n".join(splits["notes"])):
        assert f"fraction 0.0063 (0.63 % requested) trains on 3 images ({share} of the pool's {pool})" in text
        assert "raised to 1 image for benign, malignant, normal" in text
        assert "as many as fraction(s) 0.0125" in text and "as many as fraction(s) 0.0063" in text
    assert "fraction 1 " not in "\n".join(splits["notes"])


def test_split_command_names_raised_classes_and_the_real_share(tmp_path, capsys):
    make_busi(tmp_path / "busi", per_class=6)
    out = tmp_path / "splits.json"
    assert main(["split", "--dataset", "busi", "--root", str(tmp_path / "busi"), "--fractions", "0.0063", "1.0",
                 "--folds", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text(encoding="utf-8"))["fractions"][0]
    assert record["bumped_classes"] == ["benign", "malignant", "normal"]
    assert "raised to 1 image: benign, malignant, normal" in printed and "['0', '1', '2']" not in printed
    assert f"fraction 0.0063 (actual {100 * record['actual_fraction']:.3g} % of the pool)" in printed


def test_prepare_data_counts_carry_the_real_share_from_a_fresh_split_or_a_file(tmp_path, caplog):
    from medadapt.engine.data import prepare_data

    make_busi(tmp_path / "busi", per_class=6)
    options = {"dataset_dir": str(tmp_path / "busi"), "task": "classification", "fraction": 0.0063, "fold": 1,
               "folds": 2, "check": "none"}
    fresh = prepare_data("busi", output_dir=str(tmp_path / "a"), **options)["counts"]
    pool = fresh["pool"]
    assert fresh["train"] == 3 and fresh["fraction"] == 0.0063
    assert fresh["actual_fraction"] == round(3 / pool, 6) and fresh["bumped_classes"] == ["benign", "malignant", "normal"]
    assert f"{100 * 3 / pool:.3g} % of the pool's {pool}" in caplog.text
    # From a splits file made by `medadapt split`: the same numbers, and the same warning in this run.
    splits_file = tmp_path / "s.json"
    assert main(["split", "--dataset", "busi", "--root", str(tmp_path / "busi"), "--fractions", "0.0063", "0.0125",
                 "--folds", "2", "--out", str(splits_file)]) == 0
    caplog.clear()
    read = prepare_data("busi", output_dir=str(tmp_path / "b"), splits_file=str(splits_file), **options)["counts"]
    assert {k: read[k] for k in fresh} == {**fresh, "same_count_as": [0.0125]}
    assert "raised to 1 image for benign, malignant, normal" in caplog.text


def test_a_splits_file_from_before_the_real_counts_still_reads(tmp_path, caplog):
    from medadapt.engine.data import prepare_data

    make_busi(tmp_path / "busi", per_class=6)
    splits_file = tmp_path / "s.json"
    assert main(["split", "--dataset", "busi", "--root", str(tmp_path / "busi"), "--fractions", "0.0063",
                 "--folds", "1", "--out", str(splits_file)]) == 0
    splits = json.loads(splits_file.read_text(encoding="utf-8"))
    for key in ("train_counts", "actual_fraction", "bumped_classes", "same_count_as"):
        del splits["fractions"][0][key]
    splits_file.write_text(json.dumps(splits), encoding="utf-8")
    counts = prepare_data("busi", str(tmp_path / "busi"), str(tmp_path / "run"), task="classification",
                          fraction=0.0063, folds=1, splits_file=str(splits_file), check="none")["counts"]
    assert counts["train"] == 3 and counts["bumped_classes"] == ["benign", "malignant", "normal"]
    assert counts["same_count_as"] == [] and "raised to 1 image for benign, malignant, normal" in caplog.text
    assert f"trains on 3 images ({100 * 3 / counts['pool']:.3g} % of the pool's {counts['pool']})" in caplog.text
