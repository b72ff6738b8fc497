"""``medadapt split``: write a data-fraction splits JSON for a dataset in its official layout.

Example::

    medadapt split --dataset busi --root data/Dataset_BUSI_with_GT \\
        --fractions 0.0063 0.0125 1.0 --folds 5 --seed 0 --out splits.json

The dataset is validated first (every file opened and read) unless ``--check`` says otherwise.
"""

from __future__ import annotations

import argparse

from medadapt.data.dataset import datasets, get_dataset, load_datalist
from medadapt.data.splits import make_splits, save_splits, split_summary


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``split`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser(
        "split",
        help="write a splits JSON (fixed test set + per-fraction, per-fold training subsets)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", required=True, choices=sorted(datasets()), help="dataset")
    parser.add_argument("--root", required=True, help="dataset folder in the official layout")
    parser.add_argument("--task", default=None, help="task, for datasets with several (busi: classification or segmentation)")
    parser.add_argument("--release", default="auto", help="BraTS release: 2021, 2023, msd or auto (default)")
    parser.add_argument("--mask-cache", default=None, help="BUSI segmentation: folder for merged masks")
    parser.add_argument("--fractions", type=float, nargs="+", required=True, help="training fractions of the pool, in (0, 1]")
    parser.add_argument("--folds", type=int, default=5, help="training subsets per fraction (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share held out as the fixed test set (default 0.2)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of the rest held out as the validation set that chooses checkpoints (default 0.1)")
    parser.add_argument("--duplicates", choices=("group", "raise"), default="group",
                        help="identical images: keep them in one group (default) or stop with an error")
    parser.add_argument("--check", choices=("full", "headers", "none"), default="full",
                        help="validate the dataset first: read all data (default), headers only, or skip")
    parser.add_argument("--out", required=True, help="output JSON path")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``medadapt split`` with parsed ``args``."""
    preset = get_dataset(args.dataset)
    task = preset.check_task(args.task).name
    # Reader options only the datasets that have them take (the others ignore them).
    options = {"release": args.release, "mask_cache": args.mask_cache}
    datalist = load_datalist(args.dataset, args.root, task=task, **options)
    if args.check != "none":
        preset.validate(datalist, task, root=args.root, read_data=args.check == "full", release=args.release)
    splits = make_splits(
        datalist,
        fractions=args.fractions,
        folds=args.folds,
        seed=args.seed,
        test_fraction=args.test_fraction,
        val_fraction=args.val_fraction,
        group_key="group",
        label_key=preset.stratify_key,
        root=args.root,
        duplicates=args.duplicates,
        classes=preset.classes,
        dataset=args.dataset,
    )
    splits["task"] = task
    try:
        path = save_splits(splits, args.out)
    except OSError as error:  # a full disk, a read-only folder
        raise ValueError(f"--out {args.out}: cannot write the splits file ({error.strerror or error}); "
                         "a file already there is unchanged") from None
    print(split_summary(splits))
    print(f"wrote {path}")
    return 0
