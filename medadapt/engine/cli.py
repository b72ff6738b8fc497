"""``medadapt bundle``: the bundles that ship with medadapt, in the MONAI model-zoo layout.

    medadapt bundle list                       # the bundles and where they are
    medadapt bundle export dka_brats DIR       # DIR/configs, models/model.pt, docs/, LICENSE
    medadapt bundle export dka_brats DIR --formats onnx pt2   # and models/model.onnx, model.pt2
    medadapt bundle verify DIR                 # the model zoo's checks on an exported bundle
"""

from __future__ import annotations


def _list(args) -> int:
    from medadapt import bundles

    for name in bundles.names():
        print(f"{name:<24} {bundles.path(name)}")
    return 0


def _export(args) -> int:
    from medadapt.engine.bundle import EXPORT_FORMATS, export_bundle

    dest = export_bundle(args.bundle, args.dest, model=args.model, untrained=args.untrained, url=args.url,
                         formats=args.formats)
    note = " (untrained: its adapters and head are as initialised)" if args.untrained else ""
    note += "".join(f"; models/model.{name}: {EXPORT_FORMATS[name]}" for name in args.formats)
    print(f"wrote {dest}{note}; run it from there: python -m monai.bundle run --config_file configs/train.json")
    return 0


def _verify(args) -> int:
    from medadapt.engine.bundle import verify_bundle

    for check in verify_bundle(args.folder, device=args.device):
        print(f"passed: {check}")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bundle", help="list, export (model-zoo layout) and verify bundles")
    commands = parser.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    commands.add_parser("list", help="the bundles that ship with medadapt").set_defaults(func=_list)
    export = commands.add_parser("export", help="write a bundle in the MONAI model-zoo layout")
    export.add_argument("bundle", help="a bundle name (see `medadapt bundle list`) or a bundle folder")
    export.add_argument("dest", help="a new folder")
    export.add_argument("--model", help="the model.pt to include (default: the bundle's models/model.pt)")
    export.add_argument("--untrained", action="store_true",
                        help="without a trained model, include the network as built (untrained adapters and head)")
    export.add_argument("--url", default="", help="where models/model.pt will be published (large_files.yml)")
    export.add_argument("--formats", nargs="+", default=[], choices=["onnx", "pt2", "ts"], metavar="FORMAT",
                        help="also write the network as models/model.onnx, model.pt2 (torch.export) and/or model.ts "
                             "(TorchScript): any batch size, named input and output, the bundle's metadata inside")
    export.set_defaults(func=_export)
    verify = commands.add_parser("verify", help="run the MONAI model zoo's checks on a bundle in the zoo layout")
    verify.add_argument("folder")
    verify.add_argument("--device", default="cpu")
    verify.set_defaults(func=_verify)
