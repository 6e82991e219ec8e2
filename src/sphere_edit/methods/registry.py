"""The one place editing methods are looked up by name.

A method's module declares everything about itself with :func:`register_method` (a class
decorator): its options (type, default, valid range, help), the preset sections it reads,
its default SPHERE strength and a help line. Everything else (the CLI's method help, the
preset reader, :class:`~sphere_edit.editing.build.MethodSpec`) asks this registry, so a new
method is one file. The built-in methods register when :mod:`sphere_edit.methods` is
imported.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_SPHERE_ALPHA = 0.8


class MethodOptionError(ValueError):
    """A method option with an unknown name, a wrong type or a value out of range."""


@dataclass(frozen=True)
class Option:
    """One option of a method: ``kind`` is ``float``, ``int`` or ``bool``; the value must lie in
    the range from ``low`` to ``high`` (each bound exclusive when its ``*_open`` flag is
    set; ``None``: unbounded); ``nullable`` allows ``None`` (e.g. FT's unconstrained
    ``epsilon``)."""

    name: str
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False

    def range_text(self) -> str:
        """The valid values, e.g. ``a number in (0, 1]``."""
        if self.kind is bool:
            return "true or false"
        what = "an integer" if self.kind is int else "a number"
        if self.low is None and self.high is None:
            text = what
        elif self.high is None:
            text = f"{what} {'>' if self.low_open else '>='} {self.low:g}"
        elif self.low is None:
            text = f"{what} {'<' if self.high_open else '<='} {self.high:g}"
        else:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{what} in {left}{self.low:g}, {self.high:g}{right}"
        return text + (" or null" if self.nullable else "")

    def check(self, method: str, value: Any) -> Any:
        """``value`` unchanged if it is valid, else a one-line :class:`MethodOptionError`."""
        if value is None and self.nullable:
            return value
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise MethodOptionError(
                f"method option {self.name!r} of {method} must be true or false, "
                f"got {value!r}; set it with --option {self.name}=true"
            )
        # bool is an int subclass, but true/false is never a meaningful number here.
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if self.kind is int:
            is_number = is_number and float(value).is_integer()
        if not is_number or not math.isfinite(value) or not self._in_range(value):
            raise MethodOptionError(
                f"method option {self.name!r} of {method} must be {self.range_text()}, "
                f"got {value!r}; set it with --option {self.name}=VALUE"
            )
        return value

    def _in_range(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None:
            return value < self.high if self.high_open else value <= self.high
        return True


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows about one method.

    ``inherits`` names the preset sections read underneath the method's own (RECT and
    PRUNE take MEMIT's ``mom2_weight``); only the options the method declares are taken
    from them. ``sphere_alpha_key`` is the entry of a preset's ``sphere`` section that
    overrides ``sphere_alpha``, the method's default SPHERE strength.
    """

    name: str
    factory: Callable[..., Any]
    options: tuple[Option, ...]
    help: str
    inherits: tuple[str, ...] = ()
    sphere_alpha: float = DEFAULT_SPHERE_ALPHA
    sphere_alpha_key: str = "alpha_other"

    @property
    def single_layer(self) -> bool:
        """Whether the method edits exactly one layer (declared on its class)."""
        return bool(getattr(self.factory, "single_layer", False))

    @property
    def own_band(self) -> bool:
        """Whether the method edits a band of layers of its own choosing (UltraEdit: a
        ``default_layers`` on its class) rather than the preset's MEMIT window."""
        return callable(getattr(self.factory, "default_layers", None))

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(option.name for option in self.options)

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` checked against the declarations (values unchanged, so that the
        method and its journal header are what they would be without the check)."""
        declared = {option.name: option for option in self.options}
        checked: dict[str, Any] = {}
        for key, value in options.items():
            if key not in declared:
                valid = ", ".join(declared) or "none"
                raise MethodOptionError(
                    f"method option {key!r}: {self.name} has no such option; valid: {valid}"
                )
            checked[key] = declared[key].check(self.name, value)
        return checked

    def make(self, **options: Any) -> Any:
        """The method with ``options`` (validated) over the declared defaults."""
        return self.factory(**self.validate(options))


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(
    *,
    help: str,
    options: tuple[Option, ...] = (),
    inherits: tuple[str, ...] = (),
    sphere_alpha: float = DEFAULT_SPHERE_ALPHA,
    sphere_alpha_key: str = "alpha_other",
) -> Callable[[type], type]:
    """A class decorator that registers the method under its ``name`` class attribute.

    For a dataclass the declared options must be its fields with the same defaults, so
    that the declarations cannot drift from the constructor."""

    def decorate(cls: type) -> type:
        name = cls.name  # type: ignore[attr-defined]
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered already; unregister it first")
        if "+" in name or name != name.strip().lower() or not name:
            raise ValueError(f"method name {name!r} must be lower case, without '+'")
        if dataclasses.is_dataclass(cls):
            fields = {f.name: f.default for f in dataclasses.fields(cls) if f.init}
            declared = {o.name: o.default for o in options}
            if fields != declared:
                raise ValueError(
                    f"method {name}: declared options {declared} differ from the fields {fields}"
                )
            _check_on_construction(cls, name, tuple(options))
        _REGISTRY[name] = MethodInfo(
            name=name, factory=cls, options=tuple(options), help=help, inherits=inherits,
            sphere_alpha=sphere_alpha, sphere_alpha_key=sphere_alpha_key,
        )  # fmt: skip
        return cls

    return decorate


def _check_on_construction(cls: type, name: str, options: tuple[Option, ...]) -> None:
    """Check every declared option whenever the class is constructed, also directly in
    Python: the ranges are written once, in the declaration, not again in the class."""
    init = cls.__init__

    @functools.wraps(init)
    def checked_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        for option in options:
            option.check(name, getattr(self, option.name))

    cls.__init__ = checked_init  # type: ignore[misc]


def unregister_method(name: str) -> None:
    """Forget a method (tests registering their own)."""
    _REGISTRY.pop(name, None)


def method_names() -> list[str]:
    """The registered methods, in registration order."""
    return list(_REGISTRY)


def get_method(name: str) -> MethodInfo:
    """The registered method ``name``; an unknown name is a one-line ValueError."""
    if name not in _REGISTRY:
        raise ValueError(
            f"method: unknown method {name!r}; choose one of {', '.join(_REGISTRY)} "
            "(add '+sphere' for the SPHERE projection)"
        )
    return _REGISTRY[name]


def method_help() -> str:
    """For the CLI: every method with its help line, and the ``+sphere`` suffix."""
    listed = "; ".join(f"{name} ({info.help})" for name, info in _REGISTRY.items())
    return f"{listed}. Add '+sphere' for SPHERE."


def options_help() -> str:
    """For the CLI's ``--option``: every method's options, e.g. ``memit: mom2_weight``."""
    listed = (f"{n}: {', '.join(info.option_names) or '-'}" for n, info in _REGISTRY.items())
    return "; ".join(listed)


class MethodClasses(Mapping[str, type]):
    """A read-only view of the registry as ``name -> class``."""

    def __getitem__(self, name: str) -> type:
        return _REGISTRY[name].factory  # type: ignore[return-value]

    def __iter__(self) -> Iterator[str]:
        return iter(list(_REGISTRY))

    def __len__(self) -> int:
        return len(_REGISTRY)
