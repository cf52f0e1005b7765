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
    as the config spells it) and the choices.

    Args:
        kind: the option, as the config spells it (`model.downsample`).
        value: the value given.
        choices: the values it may take.

    Returns:
        `value`.

    Raises:
        UnknownChoice: `value` is not among `choices`.
    """
    choices = list(choices)
    if value not in choices:
        names = ", ".join("null" if c is None else str(c) for c in choices)
        raise UnknownChoice(f"unknown {kind} '{value}'; expected one of: {names}")
    return value


class Registry(Generic[T]):
    """A table of names to factories (classes, functions) that a config option chooses from.

    Args:
        kind: names the choice in errors, as the user sets it (e.g. `model.activation`).
        package: where the entries live; each of its modules is imported before the first
            lookup, so a new entry is one file that registers itself, with no list to extend.
            None: the entries are registered where the registry is defined.
    """

    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind, self.package = kind, package
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator that registers what it decorates under `name`.

        Args:
            name: the name a config chooses it by.

        Returns:
            The decorator: it returns the entry itself, and raises KeyError where `name` is
                registered already.
        """
        def add(item: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = item
            return item

        return add

    def names(self) -> list[str]:
        """Every registered name, once the package's modules are imported.

        Returns:
            The names, sorted.
        """
        self._import_package()
        return sorted(self._items)

    def _import_package(self) -> None:
        if self.package is None:
            return
        package, self.package = importlib.import_module(self.package), None  # once
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")

    def get(self, name: str) -> T:
        """The entry registered under `name`.

        Args:
            name: as the config gives it.

        Returns:
            The entry.

        Raises:
            UnknownChoice: no entry has that name; the message lists those that do.
        """
        return self.get_as(self.kind, name)

    def get_as(self, key: str, name: str) -> T:
        """The entry registered under `name`, where the config key `key` names it.

        Args:
            key: the config key that gave the name, for the error.
            name: as the config gives it.

        Returns:
            The entry.

        Raises:
            UnknownChoice: no entry has that name; the message lists those that do.
        """
        return self._items[choose(key, name, self.names())]
