"""Plain value classes for what `hvm run` builds at every start (the VM description, boot and device records).

A `@dataclass` costs 0.3-1 ms to create (it compiles source for each generated method, and importing
`dataclasses` pulls in `inspect`, `ast`, `dis`, `tokenize`): with ~30 of them on the start-up path that was a
fifth of `hvm run`'s time. These classes write their `__init__` by hand and get equality, hashing, repr and
immutability here, from the tuple of field names `_fields`, as a frozen dataclass would give them (same
repr, same ==), for a few microseconds each.
"""
from __future__ import annotations

TYPE_CHECKING = False   # (typing itself is not imported at run time)
if TYPE_CHECKING:
    from typing import Any


class Frozen:
    """An immutable record: subclasses name their fields in `_fields` and set them in `__init__` with
    `self._set(name=value, ...)`. Compared, hashed and shown field by field, like a frozen dataclass."""

    _fields: tuple[str, ...] = ()
    _hidden: tuple[str, ...] = ()     # fields left out of repr (dataclasses' field(repr=False))

    def _set(self, **values: Any) -> None:
        self.__dict__.update(values)

    def _values(self) -> tuple:
        return tuple([getattr(self, name) for name in self._fields])

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields if name not in self._hidden)
        return f"{self.__class__.__qualname__}({shown})"

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a {self.__class__.__name__} (immutable)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a {self.__class__.__name__} (immutable)")

    def replace(self, **changes: Any):
        """A copy with some fields changed (dataclasses.replace), through __init__ and so its checks."""
        unknown = [name for name in changes if name not in self._fields]
        if unknown:
            raise TypeError(f"{self.__class__.__name__} has no field {unknown[0]!r}")
        values = {name: getattr(self, name) for name in self._fields}
        values.update(changes)
        return self.__class__(**values)

    def as_dict(self) -> dict[str, Any]:
        """Field name -> value (not recursive)."""
        return {name: getattr(self, name) for name in self._fields}


class Record(Frozen):
    """A mutable record: as Frozen, but its fields can be assigned (and it is not hashable, as a dataclass
    with eq and without frozen is not)."""

    __hash__ = None  # type: ignore[assignment]
    __setattr__ = object.__setattr__
    __delattr__ = object.__delattr__
