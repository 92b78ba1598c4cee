"""Closed registries: sites build models and tasks by *name* from these, never from a path
that arrived over the wire. Duplicate names are refused; a typo lists the valid names."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


class Registry:
    """Name -> (config dataclass, factory taking that config)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, tuple[type, Callable[[Any], Any]]] = {}

    def register(self, name: str, config_cls: type) -> Callable:
        def decorator(factory: Callable[[Any], Any]) -> Callable[[Any], Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = (config_cls, factory)
            return factory
        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def config(self, name: str, options: dict[str, Any] | None = None) -> Any:
        """Validated config dataclass for ``name`` from plain options."""
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        config_cls = self._entries[name][0]
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for {self.kind} {name!r}; "
                             f"valid: {sorted(known)}")
        return config_cls(**options)

    def factory(self, name: str) -> Callable[[Any], Any]:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._entries[name][1]

    def build(self, name: str, options: dict[str, Any] | None = None) -> Any:
        return self._entries[name][1](self.config(name, options)) if name in self._entries \
            else self.config(name, options)   # config() raises the clear unknown-name error


MODELS = Registry("model")
TASKS = Registry("task")
