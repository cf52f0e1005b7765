"""A name -> factory table, so configs pick components by name without if/elif chains; and
`choose`, the one check (and message) for an option that names one of a fixed set of choices.

Both raise `UnknownChoice`, a plain ValueError: the code that builds objects (`nn/`, `models/`,
`optim.py`, `data/`) knows nothing of configs, and `checks.check_builds` turns what it raises
while building a stage into the one-line `ConfigError`.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Iterable, TypeVar

T = TypeVar("T")
V = TypeVar("V")


class UnknownChoice(ValueError):
    """A name that is not among the choices of an option."""


def choose(kind: str, value: V, choices: Iterable[V]) -> V:
    """`value` if it is among `choices`; otherwise an UnknownChoice naming the option (`kind`,
    as the config spells it) and the choices."""
    choices = list(choices)
    if value not in choices:
        names = ", ".join("null" if c is None else str(c) for c in choices)
        raise UnknownChoice(f"unknown {kind} '{value}'; expected one of: {names}")
    return value


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str | None = None) -> None:
        """`kind` names the choice in errors, as the user sets it (e.g. `model.activation`).
        `package`: where the entries live; each of its modules is imported before the first
        lookup, so a new entry is one file that registers itself, with no list to extend."""
        self.kind, self.package = kind, package
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = item
            return item

        return add

    def names(self) -> list[str]:
        self._import_package()
        return sorted(self._items)

    def _import_package(self) -> None:
        if self.package is None:
            return
        package, self.package = importlib.import_module(self.package), None  # once
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")

    def get(self, name: str) -> T:
        return self._items[choose(self.kind, name, self.names())]
