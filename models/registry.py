"""Closed registries: sites build models and tasks by *name* from these, never from a path
that arrived over the wire. Duplicate names are refused; a typo lists the valid names."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


class Registry:
    """Name -> (config dataclass, factory taking that config).

    A factory may also need things only the building side has (a site's own directory of
    pretrained weights): it declares their keyword names as ``resources`` when registered,
    and ``build`` passes it those - never anything that came in the options.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, tuple[type, Callable[..., Any]]] = {}
        self._resources: dict[str, tuple[str, ...]] = {}

    def register(self, name: str, config_cls: type, *, resources: tuple[str, ...] = ()
                 ) -> Callable:
        def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = (config_cls, factory)
            self._resources[name] = tuple(resources)
            return factory
        return decorator

    def config_class(self, name: str) -> type:
        """The config dataclass of ``name`` (its fields are the valid options)."""
        self.factory(name)          # the clear unknown-name error
        return self._entries[name][0]

    def resources(self, name: str) -> tuple[str, ...]:
        """The keyword resources ``name``'s factory takes from the building side."""
        self.factory(name)          # the clear unknown-name error
        return self._resources[name]

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

    def build(self, name: str, options: dict[str, Any] | None = None, **resources: Any) -> Any:
        """Build ``name`` from ``options``; of ``resources``, the factory gets those it
        declared when registered (the others are for other entries and are ignored)."""
        config = self.config(name, options)     # raises the clear unknown-name error
        wanted = {k: v for k, v in resources.items() if k in self._resources[name]}
        return self._entries[name][1](config, **wanted)


MODELS = Registry("model")
TASKS = Registry("task")
