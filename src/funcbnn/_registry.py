"""Name -> factory registries for posterior families and priors."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[F]):
    """A mapping from names to factories, extensible with a decorator.

    Examples
    --------
    >>> reg = Registry("prior")
    >>> @reg.register("flat")
    ... def flat(scale: float = 1.0):
    ...     return scale
    >>> reg.build("flat", scale=2.0)
    2.0
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}
        self._aliases: dict[str, str] = {}
        self._examples: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, *, overwrite: bool = False, example: Callable[..., Any] | None = None) -> Callable[[F], F]:
        """Decorator that registers ``factory`` under ``name``.

        ``example`` is an optional function giving a small instance for tests
        (for posterior families: ``(params, generator) -> (family, state)``,
        which the contract suite runs on).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty str, got {name!r}")

        def decorate(factory: F) -> F:
            if name in self._factories and not overwrite:
                raise ValueError(f"a {self.kind} named {name!r} is already registered; pass overwrite=True")
            self._factories[name] = factory
            if example is not None:
                self._examples[name] = example
            return factory

        return decorate

    def alias(self, alias: str, name: str) -> None:
        """Make ``alias`` another name for the factory registered as ``name``."""
        factory = self.get(name)
        self.register(alias)(factory)
        self._aliases[alias] = name

    def canonical(self, name: str) -> str:
        """The name ``name`` is an alias of (itself if it is no alias); raises for unknown names."""
        self.get(name)
        return self._aliases.get(name, name)

    def examples(self) -> dict[str, Callable[..., Any]]:
        """Name -> example builder, for every entry registered with one."""
        return dict(self._examples)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._factories)

    def get(self, name: str) -> Callable[..., Any]:
        """The factory registered under ``name``; the ``ValueError`` for an unknown name lists the known ones."""
        try:
            return self._factories[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown {self.kind} {name!r}; registered {self.kind} names: {', '.join(self.names())}"
            ) from None

    def build(self, name: str, **kwargs: Any) -> Any:
        """Call the factory for ``name`` with ``kwargs``, naming any keyword it does not take."""
        factory = self.get(name)
        params = inspect.signature(factory).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(kwargs) - set(params))
            if unknown:
                raise TypeError(
                    f"{self.kind} {name!r} got unexpected keyword argument(s) {unknown}; "
                    f"it takes {sorted(params)}"
                )
        return factory(**kwargs)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self):
        return iter(self.names())
