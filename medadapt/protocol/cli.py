"""``medadapt bench``: benchmark commands; ``medadapt bench protocol`` runs the papers' table.

Each ``bench`` subcommand is one line in ``BENCH_COMMANDS`` (name, help, and the function
that configures its parser, as a callable or a ``"module:function"`` string imported only
when the parser is built), or one call of `add_bench_command` before the parser is built::

    BENCH_COMMANDS.append(("erf-sweep", "ERF area ratios per kernel size", "mypackage.sweep:configure"))
    # or: add_bench_command("erf-sweep", "ERF area ratios per kernel size", configure)

``configure(parser)`` adds the arguments and sets ``func`` (``parser.set_defaults(func=run)``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
from collections.abc import Callable
from typing import Any

PROTOCOL_DESCRIPTION = """\
Run every (method, data fraction, fold) cell of the papers' low-data protocol on ONE fixed
test set and print the table: mean ± std over folds per method and fraction, with the
absolute training counts and each method's trainable parameters. Finished cells are stored
in OUT/cells/ and skipped when the command is run again (resume after an interruption, or
add methods / fractions / folds later).

Examples:
  medadapt bench protocol --dataset busi --task classification --root data/Dataset_BUSI_with_GT \\
      --methods dka lka adapter lora linear --fractions 0.0063 0.0125 1.0 --folds 3 \\
      --epochs 50 --backbone litemedsam --out results/busi_cls
  medadapt bench protocol                      # the embedded BUSI demo, quick backbone, minutes
  medadapt bench protocol --dataset mni152_tissue --fractions 0.05 0.1 0.2 --folds 2 --steps 10 \\
      --out results/mni152                     # real MNI152 MRI, grey/white matter, LiteMedSAM
  medadapt bench protocol --dataset mni152_tissue_3d --fractions 0.2 --folds 2 --steps 10 \\
      --batch-size 1 --out results/mni152_3d   # the same MRI as 4-slice stacks, 3D adapters
"""

# One line per bench subcommand: (name, help, configure) with configure a callable or "module:function".
BENCH_COMMANDS: list[tuple[str, str, Callable | str]] = [
    ("protocol", "the papers' table: methods x data fractions x folds on one fixed test set",
     "medadapt.protocol.cli:configure_protocol"),
    ("perf", "speed and memory ratios (benchmarks/run.py of a source checkout)", "medadapt.protocol.perf:configure"),
    ("evidence", "the papers' comparison on real MNI152 MRI, 2D and 3D, with statistics (docs/protocol.md)",
     "medadapt.protocol.evidence:configure"),
]


def add_bench_command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], Any] | str) -> None:
    """Register ``medadapt bench <name>`` (replacing an entry of the same name).

    Arguments:
        name: the subcommand.
        help: one line for ``medadapt bench --help``.
        configure: ``configure(parser)`` adding its arguments and setting ``func``; or a
            ``"module:function"`` string naming it.
    """
    BENCH_COMMANDS[:] = [entry for entry in BENCH_COMMANDS if entry[0] != name]
    BENCH_COMMANDS.append((name, help, configure))


def _resolve(configure: Callable | str) -> Callable:
    if callable(configure):
        return configure
    module, _, function = str(configure).partition(":")
    return getattr(importlib.import_module(module), function)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` (with one sub-subcommand per ``BENCH_COMMANDS`` entry) to ``subparsers``."""
    bench = subparsers.add_parser("bench", help="benchmarks: " + ", ".join(name for name, _, _ in BENCH_COMMANDS),
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = bench.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND")
    for name, help_text, configure in BENCH_COMMANDS:
        parser = commands.add_parser(name, help=help_text)
        _resolve(configure)(parser)

    def usage(args) -> int:
        bench.print_help()
        return 2

    bench.set_defaults(func=usage)
    return bench


# ----------------------------------------------------------------------------- bench protocol

def parse_option(text: str, what: str) -> tuple[str, Any]:
    """``"key=value"`` with the value parsed as JSON where possible (``depths=[1,1,1,1]``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{what}: expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def parse_method_options(items: list[str]) -> dict[str, dict]:
    """``["dka:bottleneck=8", "lora:rank=4"]`` -> {"dka": {"bottleneck": 8}, "lora": {"rank": 4}}."""
    options: dict[str, dict] = {}
    for item in items:
        method, sep, rest = item.partition(":")
        if not sep or not method:
            raise ValueError(f"--method-option: expected METHOD:KEY=VALUE, got {item!r}")
        key, value = parse_option(rest, "--method-option")
        options.setdefault(method, {})[key] = value
    return options


def configure_protocol(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``medadapt bench protocol``."""
    from medadapt.data.dataset import datasets

    parser.description = PROTOCOL_DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="busi", help=f"dataset: {', '.join(datasets())} (default busi)")
    data.add_argument("--task", help="classification, segmentation or segmentation3d (default: the dataset's first)")
    data.add_argument("--root", help="dataset folder in its official layout; without it the embedded demo is "
                      "used (mni152_tissue[_3d]: where to write its slices)")
    data.add_argument("--demo-option", action="append", default=[], metavar="KEY=VALUE",
                      help="demo generator option, e.g. per_class=4 (repeatable)")
    data.add_argument("--demo-dir", help="where to build the demo (default OUT/data)")
    data.add_argument("--image-size", type=int, help="input size in pixels (default 64 on the demo, else 256)")
    data.add_argument("--test-fraction", type=float, default=0.2,
                      help="share of each class in the fixed test set (default 0.2)")
    data.add_argument("--val-fraction", type=float, default=0.1,
                      help="share of the rest held out to choose each cell's checkpoint (default 0.1)")
    grid = parser.add_argument_group("grid")
    grid.add_argument("--methods", nargs="+", default=["dka", "lka", "adapter", "lora", "linear"],
                      help="table rows: adapter methods at their papers' size, METHOD@iso:ROW sized to another row's "
                           "trainable parameters, 'unet' (a MONAI U-Net from scratch); the first row is the "
                           "reference of the paired comparisons (default: dka lka adapter lora linear)")
    grid.add_argument("--fractions", nargs="+", type=float, default=[0.0063, 0.0125, 1.0],
                      help="training fractions of the pool, in (0, 1] (default 0.0063 0.0125 1.0)")
    grid.add_argument("--folds", type=int, default=3, help="training subsets per fraction (default 3)")
    model = parser.add_argument_group("model")
    model.add_argument("--bundle", help="the bundle folder every cell runs (default: the repository's bundle for "
                       "the dataset and task)")
    model.add_argument("--backbone", help="backbone name (default litemedsam; on the demo a quick random-weight "
                       "timm ViT, so the demo finishes in minutes)")
    model.add_argument("--backbone-option", action="append", default=[], metavar="KEY=VALUE",
                       help="backbone option, VALUE parsed as JSON when it can be (repeatable)")
    model.add_argument("--backbone-checkpoint", help="pretrained backbone weights file")
    model.add_argument("--method-option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                       help="method option, e.g. dka:bottleneck=8 (repeatable)")
    model.add_argument("--iso-params", type=int, metavar="N",
                       help="size each method's bottleneck / rank / prompt length to the trainable-parameter "
                       "count closest to N")
    recipe = parser.add_argument_group("training")
    recipe.add_argument("--epochs", type=int, help="passes over each training subset (default: the bundle's max_epochs)")
    recipe.add_argument("--steps", type=int, help="fixed number of optimiser steps per cell instead of --epochs")
    recipe.add_argument("--batch-size", type=int, help="batch size (default: the bundle's)")
    recipe.add_argument("--lr-adapter", type=float, help="adapter learning rate (default: the bundle's, 1e-3)")
    recipe.add_argument("--lr-head", type=float,
                        help="head / decoder learning rate (default: the bundle's: 1e-4 for a classification "
                             "head, 1e-3 for a segmentation decoder that starts from scratch)")
    recipe.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: the bundle's, 1e-4)")
    recipe.add_argument("--seed", type=int, default=0, help="seed of the splits and every cell (default 0)")
    recipe.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    recipe.add_argument("--ray", metavar="ADDRESS",
                        help="run the cells as Ray tasks on the cluster at ADDRESS ('local': a local Ray runtime; "
                        "pip install 'medadapt[ray]')")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default="results", help="output folder (default results/)")
    output.add_argument("--overwrite", action="store_true",
                        help="recompute finished cells whose stored settings differ (default: stop with an error)")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_protocol_command)


def _command_line() -> str | None:
    """The command as typed, when this process is the ``medadapt`` command (not a test calling main())."""
    program = sys.argv[0].replace("\\", "/").rsplit("/", 1)[-1] if sys.argv else ""
    if program not in ("medadapt", "__main__.py"):
        return None
    return " ".join(["medadapt", *(shlex.quote(a) for a in sys.argv[1:])])


def run_protocol_command(args: argparse.Namespace) -> int:
    """Run ``medadapt bench protocol`` with parsed ``args``; prints the table."""
    from medadapt.protocol.runner import run_protocol

    backbone_options = dict(parse_option(o, "--backbone-option") for o in args.backbone_option)
    demo_options = dict(parse_option(o, "--demo-option") for o in args.demo_option)
    command = _command_line()
    table = run_protocol(
        dataset=args.dataset, task=args.task, root=args.root, methods=args.methods, fractions=args.fractions,
        folds=args.folds, epochs=args.epochs, steps=args.steps, backbone=args.backbone,
        backbone_options=backbone_options, backbone_checkpoint=args.backbone_checkpoint,
        method_options=parse_method_options(args.method_option), iso_params=args.iso_params,
        image_size=args.image_size, batch_size=args.batch_size, lr_adapter=args.lr_adapter, lr_head=args.lr_head,
        weight_decay=args.weight_decay, seed=args.seed, test_fraction=args.test_fraction,
        val_fraction=args.val_fraction, demo_options=demo_options, demo_dir=args.demo_dir, out=args.out,
        overwrite=args.overwrite, progress=not args.no_progress, num_workers=args.num_workers, bundle=args.bundle,
        ray=args.ray, command=command,
    )
    print(table.markdown)
    print(f"cells: {len(table.ran)} run, {len(table.skipped)} skipped (already finished)")
    for name in ("markdown", "csv", "json"):
        print(f"wrote {table.files[name]}")
    return 0
