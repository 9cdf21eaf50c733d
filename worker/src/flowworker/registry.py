"""The flow registry: async functions registered by name, their params checked before they run.

A team's flows live in its own modules::

    from flowworker import flow

    @flow('billing.invoice', timeout=120)
    async def invoice(customer_id: int, dry_run: bool = False) -> dict[str, int]:
        ...

and the worker imports them from ``FLOWWORKER_FLOW_MODULES=billing.flows,other.flows``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError, validate_call

FlowFunction = Callable[..., Awaitable[Any]]
F = TypeVar('F', bound=FlowFunction)

BUILTIN_MODULES = ('flowworker.demo',)


class UnknownFlow(LookupError):
    pass


class BadParams(ValueError):
    pass


class FlowImportError(ImportError):
    pass


@dataclass(frozen=True)
class Flow:
    name: str
    function: FlowFunction
    timeout: float | None

    async def run(self, params: dict[str, Any]) -> Any:
        """Run the flow; :class:`BadParams` if ``params`` do not fit its signature."""
        if not isinstance(params, dict):
            raise BadParams(f'flow {self.name!r} takes params as a dict, not {type(params).__name__}')
        try:
            return await self.function(**params)
        except ValidationError as e:
            # validate_call titles its errors with the function's name; a model inside the flow has its own
            if e.title != self.function.__qualname__:
                raise
            problems = '; '.join(
                f'{".".join(map(str, err["loc"])) or "params"}: {err["msg"]}' for err in e.errors()
            )
            raise BadParams(f'flow {self.name!r} got bad params: {problems}') from None


class Registry:
    def __init__(self) -> None:
        self._flows: dict[str, Flow] = {}

    def flow(self, name: str, *, timeout: float | None = None) -> Callable[[F], F]:
        """Register an async function as flow ``name``; ``timeout`` overrides the worker's job timeout."""

        def register(function: F) -> F:
            if name in self._flows:
                raise ValueError(f'flow {name!r} is registered twice')
            self._flows[name] = Flow(name, validate_call(function), timeout)
            return function

        return register

    def get(self, name: str) -> Flow:
        try:
            return self._flows[name]
        except KeyError:
            raise UnknownFlow(
                f'unknown flow {name!r}; this worker runs: {", ".join(sorted(self._flows))}'
            ) from None

    def names(self) -> list[str]:
        return sorted(self._flows)

    def flows(self) -> list[Flow]:
        return list(self._flows.values())

    def load(self, modules: Iterable[str], project_root: Path) -> None:
        """Import the flow modules (which register their flows), with ``project_root`` importable."""
        if str(project_root) not in sys.path:
            sys.path.insert(0, str(project_root))
        for module in (*BUILTIN_MODULES, *modules):
            try:
                importlib.import_module(module)
            except Exception as e:
                raise FlowImportError(f'cannot import flow module {module!r}: {type(e).__name__}: {e}') from e


registry = Registry()
flow = registry.flow
