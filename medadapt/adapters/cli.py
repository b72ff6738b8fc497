"""``medadapt methods``: each adapter method, what it is, and the backbone families it fits."""

from __future__ import annotations

from medadapt.adapters import METHODS
from medadapt.families import FAMILIES


def supported_families(method: str) -> list[str]:
    """The backbone families ``method``'s config says it fits."""
    return [f.name for f in FAMILIES if METHODS[method].supports(f)]


def methods_table() -> str:
    width = max(len(m) for m in METHODS)
    lines = []
    for name, config in METHODS.items():
        lines.append(f"{name:<{width}}  {config.summary}")
        lines.append(f"{'':<{width}}  backbones: {', '.join(supported_families(name))}")
    return "\n".join(lines)


def _run(args) -> int:
    print(methods_table())
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("methods", help="list the adapter methods and the backbones they support")
    parser.set_defaults(func=_run)
