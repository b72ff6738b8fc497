"""Fast operators used by the adapters."""

from medadapt.ops.dwconv import dwconv

__all__ = ["dwconv"]
