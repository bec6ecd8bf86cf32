"""Frozen records without :mod:`dataclasses` (which pulls in inspect, ast and dis).

A per-connection program such as ``mailgrave-smtpd`` in ``Accept=yes`` mode
pays for every import on every connection, so the small value classes on its
path (configuration sections, SMTP replies and events, addresses) are plain
classes made into frozen records by :func:`record`: keyword or positional
construction, defaults from the class body, ``==``, ``hash``, ``repr`` and
:meth:`Record.replace`. For mypy, :func:`record` is a ``dataclass_transform``,
so constructors are type-checked as a frozen dataclass's would be.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Self, TypeVar, dataclass_transform

    _T = TypeVar("_T")


class Record:
    """Base of every record: the fields live in the instance ``__dict__``;
    a field not given falls back to the class attribute, its default."""

    _fields: tuple[str, ...] = ()
    _required: frozenset[str] = frozenset()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fields = self._fields
        if args:
            if len(args) > len(fields):
                raise TypeError(f"{type(self).__name__}: too many arguments")
            for name, value in zip(fields, args, strict=False):
                if name in kwargs:
                    raise TypeError(f"{type(self).__name__}: {name} given twice")
                kwargs[name] = value
        for name in kwargs:
            if name not in fields:
                raise TypeError(f"{type(self).__name__}: unexpected argument {name!r}")
        missing = self._required.difference(kwargs)
        if missing:
            raise TypeError(f"{type(self).__name__}: missing {', '.join(sorted(missing))}")
        self.__dict__.update(kwargs)
        post = getattr(self, "_post_init", None)
        if post is not None:
            post()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Record)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({inner})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: {type(self).__name__} is frozen")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: {type(self).__name__} is frozen")

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed (as ``dataclasses.replace``)."""
        values = {name: getattr(self, name) for name in self._fields}
        values.update(changes)
        return type(self)(**values)


_MISSING = object()


if TYPE_CHECKING:

    @dataclass_transform(frozen_default=True)
    def record(cls: type[_T]) -> type[_T]: ...

else:

    def record(cls):
        """Make ``cls`` (a subclass of :class:`Record`) a record of its annotated fields.

        A class attribute that is a :class:`Field` (see :func:`field`) is
        replaced by its default and remembered in ``cls._specs``.
        """
        own = cls.__dict__.get("__annotations__", {})  # noqa: RUF063 (no inspect here)
        fields = [*cls._fields]
        required = set(cls._required)
        specs = dict(getattr(cls, "_specs", {}))
        for name in own:
            value = cls.__dict__.get(name, _MISSING)
            if isinstance(value, Field):
                specs[name] = value
                value = value.default
                type.__setattr__(cls, name, value)
            if name not in fields:
                fields.append(name)
            if value is _MISSING:
                required.add(name)
        cls._fields = tuple(fields)
        cls._required = frozenset(required)
        cls._specs = specs
        return cls


class Field:
    """A field's default with what else a schema needs (a converter, a sub-record)."""

    __slots__ = ("convert", "default", "section")

    def __init__(
        self, default: object, convert: Callable[[object], Any] | None, section: type | None
    ) -> None:
        self.default = default
        self.convert = convert
        self.section = section


def field(default: _T, convert: Callable[[object], Any] | None = None) -> _T:
    """A field with a converter (for :mod:`mailgrave.config`); typed as its default."""
    return Field(default, convert, None)  # type: ignore[return-value]


def section(cls: type[_T]) -> _T:
    """A field holding a sub-record, by default the sub-record's defaults."""
    return Field(cls(), None, cls)  # type: ignore[return-value]


def specs(cls: type) -> dict[str, Field]:
    """The :class:`Field` of every field of a record class that declared one."""
    return dict(getattr(cls, "_specs", {}))
