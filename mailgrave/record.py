"""Frozen records without :mod:`dataclasses` (which pulls in inspect, ast and dis).

A per-connection program such as ``mailgrave-smtpd`` in ``Accept=yes`` mode
pays for every import on every connection, so the small value classes on its
path (configuration sections, SMTP replies and events, addresses) are plain
classes made into frozen records by :func:`record`: keyword or positional
construction, defaults from the class body (or a :func:`factory` for a fresh
list or dict per instance), ``==``, ``hash``, ``repr`` and
:meth:`Record.replace`. ``@record(frozen=False)`` makes a record whose fields
may be assigned (the scheduler's view of a queue entry); it has no hash. For
mypy, :func:`record` is a ``dataclass_transform``, so constructors are
type-checked as a dataclass's would be. MailGrave has no other record style.
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
    _factories: tuple[tuple[str, Callable[[], Any]], ...] = ()
    _frozen = True

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
        for name, make in self._factories:
            if name not in kwargs:
                kwargs[name] = make()
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
        if self._frozen:
            raise AttributeError(
                f"cannot assign to field {name!r}: {type(self).__name__} is frozen"
            )
        if name not in self._fields:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        self.__dict__[name] = value

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of {type(self).__name__}")

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed (as ``dataclasses.replace``)."""
        values = {name: getattr(self, name) for name in self._fields}
        values.update(changes)
        return type(self)(**values)


_MISSING = object()


if TYPE_CHECKING:
    from typing import overload

    @overload
    @dataclass_transform(frozen_default=True)
    def record(cls: type[_T], /) -> type[_T]: ...

    @overload
    @dataclass_transform(frozen_default=True)
    def record(*, frozen: bool = True) -> Callable[[type[_T]], type[_T]]: ...

    def record(cls: Any = None, /, *, frozen: bool = True) -> Any: ...

else:

    def record(cls=None, /, *, frozen=True):
        """Make ``cls`` (a subclass of :class:`Record`) a record of its annotated fields.

        A class attribute that is a :class:`Field` (see :func:`field`) is
        replaced by its default and remembered in ``cls._specs``.
        """
        if cls is None:
            return lambda cls: _make(cls, frozen)
        return _make(cls, frozen)

    def _make(cls, frozen):
        own = cls.__dict__.get("__annotations__", {})  # noqa: RUF063 (no inspect here)
        fields = [*cls._fields]
        required = set(cls._required)
        factories = dict(cls._factories)
        specs = dict(getattr(cls, "_specs", {}))
        for name in own:
            value = cls.__dict__.get(name, _MISSING)
            if isinstance(value, Field):
                specs[name] = value
                if value.factory is not None:
                    factories[name] = value.factory
                    type.__delattr__(cls, name)
                    value = None
                else:
                    value = value.default
                    type.__setattr__(cls, name, value)
            if name not in fields:
                fields.append(name)
            if value is _MISSING:
                required.add(name)
        cls._fields = tuple(fields)
        cls._required = frozenset(required)
        cls._factories = tuple(factories.items())
        cls._specs = specs
        cls._frozen = frozen
        if not frozen:
            cls.__hash__ = None
        return cls


class Field:
    """A field's default with what else a schema needs (a converter, a sub-record),
    or the factory that makes each instance's own default."""

    __slots__ = ("convert", "default", "factory", "section")

    def __init__(
        self,
        default: object,
        convert: Callable[[object], Any] | None,
        section: type | None,
        factory: Callable[[], Any] | None = None,
    ) -> None:
        self.default = default
        self.convert = convert
        self.section = section
        self.factory = factory


def field(default: _T, convert: Callable[[object], Any] | None = None) -> _T:
    """A field with a converter (for :mod:`mailgrave.config`); typed as its default."""
    return Field(default, convert, None)  # type: ignore[return-value]


def factory(make: Callable[[], _T]) -> _T:
    """A field whose default is ``make()``, called for each instance (a list, a dict)."""
    return Field(None, None, None, make)  # type: ignore[return-value]


def section(cls: type[_T]) -> _T:
    """A field holding a sub-record, by default the sub-record's defaults."""
    return Field(cls(), None, cls)  # type: ignore[return-value]


def specs(cls: type) -> dict[str, Field]:
    """The :class:`Field` of every field of a record class that declared one."""
    return dict(getattr(cls, "_specs", {}))
