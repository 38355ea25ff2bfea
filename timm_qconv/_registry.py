"""The method registry: a dict from name to quantizer class, with ``list_methods``/``get_method``.

Built-in methods add themselves through the same ``register_methods`` hook that plugins use;
:func:`register_method` is the decorator form for code that defines a method directly. This module
knows nothing of plugins: :mod:`timm_qconv.plugins` discovers them and fills the dict, and gives
this module its loader (:func:`set_loader`). A lookup loads the built-in methods first and the
installed plugins only when the name is not found there, so finding ``"hash"`` never depends on
every installed plugin importing cleanly.
"""
from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from .config import QuantConfig

if TYPE_CHECKING:
    from .methods.base import Quantizer

_METHODS: dict[str, type["Quantizer"]] = {}
_OWNERS: dict[str, str] = {}  # method name -> who registered it, for clash messages

Q = TypeVar("Q", bound=type)


_loader: Callable[[bool], None] | None = None


def set_loader(loader: Callable[[bool], None]) -> None:
    """Set what fills the registry: ``loader(False)`` the built-in methods, ``loader(True)`` all."""
    global _loader
    _loader = loader


def _ensure_loaded(everything: bool = True) -> None:
    if _loader is not None:
        _loader(everything)


def add_method(name: str, cls: type["Quantizer"], owner: str = "timm_qconv") -> None:
    """Register ``cls`` under ``name``; a name already taken by another class is an error."""
    from .methods.base import Quantizer

    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"method name {name!r} from {owner} must be a Python identifier")
    if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
        raise TypeError(f"method {name!r} from {owner}: {cls!r} is not a Quantizer subclass")
    existing = _METHODS.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"method name {name!r} registered by {owner} is already taken by {_OWNERS[name]} "
            f"({existing.__module__}.{existing.__qualname__})"
        )
    _METHODS[name] = cls
    _OWNERS[name] = owner
    cls.name = name


def remove_method(name: str) -> None:
    """Forget a method (used when a plugin is unregistered)."""
    _METHODS.pop(name, None)
    _OWNERS.pop(name, None)


def methods_owned_by(owner: str) -> list[str]:
    """Sorted names of the methods that ``owner`` (a plugin name) registered."""
    return sorted(name for name, who in _OWNERS.items() if who == owner)


def register_method(name: str) -> Callable[[Q], Q]:
    """Class decorator: ``@register_method("mine")`` registers the class and returns it unchanged."""

    def decorator(cls: Q) -> Q:
        add_method(name, cls, owner=cls.__module__)
        return cls

    return decorator


def list_methods(pattern: str = "*") -> list[str]:
    """Sorted names of the registered methods matching the glob ``pattern``."""
    _ensure_loaded()
    return sorted(n for n in _METHODS if fnmatch.fnmatchcase(n, pattern))


def get_method(method: "str | type[Quantizer]") -> type["Quantizer"]:
    """Resolve a method name (or pass a Quantizer class through)."""
    from .methods.base import Quantizer

    if isinstance(method, type) and issubclass(method, Quantizer):
        return method
    if not isinstance(method, str):
        raise TypeError(
            f"method={method!r} has type {type(method).__name__}; expected a method name, "
            f"a Quantizer class or a QuantConfig"
        )
    _ensure_loaded(everything=False)
    if method not in _METHODS:
        _ensure_loaded()
    if method not in _METHODS:
        raise ValueError(f"method={method!r} is unknown; known methods: {sorted(_METHODS)}")
    return _METHODS[method]


def make_config(method: "str | type[Quantizer] | QuantConfig" = "hash", **options: Any) -> QuantConfig:
    """Resolve ``method`` (a name, a Quantizer class or a config) and ``options`` into a validated config.

    With a config object, ``options`` override its fields (``None`` values are ignored).
    """
    options = {k: v for k, v in options.items() if v is not None}
    if isinstance(method, QuantConfig):
        owner = config_owner(method)  # must belong to a registered method
        return _named(type(method).from_kwargs(**{**method.to_dict(), **options}), owner.name)
    cls = get_method(method)
    return _named(cls.config_class.from_kwargs(**options), cls.name)


_METHOD_ATTR = "_timm_qconv_method"
"""Instance attribute (not a dataclass field) naming the method a config was made for."""


def _named(config: QuantConfig, name: str) -> QuantConfig:
    object.__setattr__(config, _METHOD_ATTR, name)  # works for frozen dataclasses too
    return config


def config_owner(config: QuantConfig) -> "type[Quantizer]":
    """The registered method a config belongs to.

    A config made by :func:`make_config` (and so by every public function taking ``method=``)
    remembers the method's registered name, so two methods sharing one config class (a subclass
    of ``KMeansQuantizer`` registered as ``"mine"``, or two plugins using the default
    ``QuantConfig``) each get their own. A config built directly (``KMeansConfig(...)``) belongs
    to the method whose class declares that config class itself; if several do, it is ambiguous.
    """
    name = getattr(config, _METHOD_ATTR, None)
    for everything in (False, True):  # the built-in methods first, installed plugins only if needed
        _ensure_loaded(everything)
        cls = _METHODS.get(name) if name is not None else None
        if cls is not None and type(config) is cls.config_class:
            return cls
        users = [cls for cls in _METHODS.values() if cls.config_class is type(config)]
        declaring = [cls for cls in users if "config_class" in vars(cls)] or users
        if len(declaring) == 1 and name is None:
            return declaring[0]
        if len(declaring) > 1 and name is None:
            names = sorted(cls.name for cls in declaring)
            raise ValueError(f"config {type(config).__name__} is used by the methods {names}; pass the method's name "
                             f"(method={names[0]!r}) or a config from make_config(name, ...) to say which")
    if name is not None and name not in _METHODS:
        raise ValueError(f"config {type(config).__name__} was made for method {name!r}, which is no longer registered; "
                         f"known: {sorted(_METHODS)}")
    raise ValueError(f"config {type(config).__name__} belongs to no registered method; known: {sorted(_METHODS)}")
