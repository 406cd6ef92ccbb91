"""Patching a library right after its first import, without importing it ourselves.

A process that never uses a library should not pay for importing it (mcp 2.x takes about a
second), and an application imports its frameworks after we are set up. One finder, first on
`sys.meta_path`, holds the waiting patches by module name; for such a module it asks the other
finders for the spec and wraps its loader's `exec_module`. The patch is taken when that runs, so a
spec looked up and never executed (`importlib.util.find_spec`, runpy for `python -m celery`)
leaves it waiting for the real import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from . import _log

Patch = Callable[[ModuleType], None]


class _PostImport(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.patches: dict[str, Patch] = {}
        self._looking: set[str] = set()

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in self.patches or name in self._looking:
            return None
        self._looking.add(name)
        try:
            spec = importlib.util.find_spec(name)  # the other finders' answer
        finally:
            self._looking.discard(name)
        loader = spec.loader if spec is not None else None
        if loader is None:
            return spec
        exec_module = loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            patch = self.patches.pop(name, None)
            if patch is not None:
                _apply(patch, module)

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]  # this spec's loader
        return spec


_finder = _PostImport()


def when_imported(name: str, patch: Patch) -> None:
    """Run `patch(module)` right after module `name` is first imported; at once if it already
    is (also when it came in through a finder ahead of ours while the patch waited)."""
    module = sys.modules.get(name)
    if module is not None:
        _finder.patches.pop(name, None)
        _apply(patch, module)
        return
    _finder.patches[name] = patch
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def waiting(name: str) -> bool:
    """Whether a patch for `name` waits for its import."""
    return name in _finder.patches


def cancel(name: str) -> None:
    """Forget the patch waiting for `name`, if any (an `uninstrument()` before the import)."""
    _finder.patches.pop(name, None)


def _apply(patch: Patch, module: ModuleType) -> None:
    try:
        patch(module)
    except Exception:
        _log.internal_error(f"patch {module.__name__}")
