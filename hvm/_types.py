"""The `typing` names hvm's modules annotate with, without importing `typing` when hvm runs (~2 ms of every
`hvm run`: docs/performance.md). Every module that imports from here has `from __future__ import
annotations`, so these names are never evaluated in an annotation; a type checker (TYPE_CHECKING) sees
typing's own."""
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterable, Mapping, Protocol
else:
    Any = Callable = Iterable = Mapping = object   # placeholders: only ever named in (unevaluated) annotations

    class Protocol:
        """Run-time stand-in for typing.Protocol: hvm's interface descriptions (Device, Cpu, VmControl,
        RouteListener) are documentation; nothing instantiates them or checks isinstance against them."""

__all__ = ["TYPE_CHECKING", "Any", "Callable", "Iterable", "Mapping", "Protocol"]
