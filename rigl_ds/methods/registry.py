"""The method registry: the config's ``method`` string to its class, open to methods defined outside
the package. Config validation and FLOPs accounting ask the class, never the name."""

from __future__ import annotations

from typing import Callable, Dict, Type, TypeVar

from .base import SparseMethod

#: Where a method name is taken (FLOPs accounting, logs), the dense baseline: never a registrable name.
DENSE = "dense"

#: Every registered method by name, in registration order (the built-ins in the paper's order).
METHODS: Dict[str, Type[SparseMethod]] = {}

M = TypeVar("M", bound=Type[SparseMethod])


def register(name: str) -> Callable[[M], M]:
    """Class decorator: makes ``name`` a valid ``"rigl".method`` that builds the decorated
    :class:`SparseMethod` subclass. A name already taken by another class is an error."""
    if not isinstance(name, str) or not name or name == DENSE:
        raise ValueError(f"a method name must be a non-empty string other than {DENSE!r}, got {name!r}")

    def decorate(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, SparseMethod)):
            raise TypeError(f"@register({name!r}) needs a SparseMethod subclass, got {cls!r}")
        taken = METHODS.get(name)
        if taken is not None and taken is not cls:
            raise ValueError(f"method {name!r} is already registered to {taken.__module__}.{taken.__qualname__}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorate


def method_class(name: str) -> Type[SparseMethod]:
    """The class registered as ``name``; an unknown name raises a ValueError listing the registered ones."""
    cls = METHODS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(METHODS)}")
    return cls
