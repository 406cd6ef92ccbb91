"""Patching a library's function, and undoing it, one way for every adapter.

As OpenTelemetry contrib's `wrapt.wrap_function_wrapper` and `unwrap`: the installed function
keeps `__wrapped__` (and the original's name and docstring, `functools.wraps`), a second
`patch` of the same attribute is a no-op, and `restore` undoes only our own layer:

```python
def send(original, adapter, request, *args, **kwargs):
    ...  # trace, then `original(adapter, request, *args, **kwargs)`

patch(HTTPAdapter, "send", send)
restore(HTTPAdapter, "send")
```

When another library patched the same attribute after us, `restore` cannot take our layer out
from under it (its wrapper holds ours): ours is left in place, inert (it calls the original
straight through), and a later `patch` makes it active again instead of stacking a second one.

An adapter's set of patches, made when its library is imported and undone together, is a
`Patches` (`instrument()`/`uninstrument()` of the celery, kombu, aio-pika, gRPC and MCP adapters).
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from . import _imports

_lock = threading.Lock()
# (owner, attribute) -> our layer there, while it is in place (active or inert).
_layers: dict[tuple[Any, str], _Layer] = {}


class _Layer:
    __slots__ = ("active", "installed", "original", "owned")

    def __init__(self, original: Any, owned: bool) -> None:
        self.original = original
        self.owned = owned  # the attribute was the owner's own, not inherited
        self.active = True
        self.installed: Any = None


def patch(owner: Any, name: str, wrapper: Callable[..., Any]) -> None:
    """Replace `owner.name` with a function that calls `wrapper(original, *args, **kwargs)`
    (a coroutine function if the original is one). Idempotent."""
    with _lock:
        layer = _live(owner, name)
        if layer is not None:
            layer.active = True
            return
        owned = name in vars(owner)
        original = vars(owner)[name] if owned else getattr(owner, name)
        layer = _Layer(original, owned)
        layer.installed = _installed(layer, wrapper, original)
        setattr(owner, name, layer.installed)
        _layers[(owner, name)] = layer


def replace(owner: Any, name: str, make: Callable[[Any], Callable[..., Any]]) -> None:
    """`patch` with a replacement built once around the original: `make(original)` returns a
    function of the original's arguments (for wrappers that close over per-original state)."""
    with _lock:
        layer = _live(owner, name)
        if layer is not None:
            layer.active = True
            return
    replacement = make(getattr(owner, name))
    patch(owner, name, lambda _original, *args, **kwargs: replacement(*args, **kwargs))


def _installed(layer: _Layer, wrapper: Callable[..., Any], original: Any) -> Any:
    if inspect.iscoroutinefunction(original):

        async def installed_async(*args: Any, **kwargs: Any) -> Any:
            if layer.active:
                return await wrapper(original, *args, **kwargs)
            return await original(*args, **kwargs)

        return functools.wraps(original)(installed_async)

    def installed(*args: Any, **kwargs: Any) -> Any:
        if layer.active:
            return wrapper(original, *args, **kwargs)
        return original(*args, **kwargs)

    return functools.wraps(original)(installed)


def restore(owner: Any, name: str) -> None:
    """Undo `patch(owner, name, ...)`: put the original back if ours is still on top, else
    leave ours inert under whoever patched after us. No-op if not patched."""
    with _lock:
        layer = _layers.get((owner, name))
        if layer is None:
            return
        layer.active = False
        if vars(owner).get(name) is not layer.installed:
            return  # another wrapper holds ours: it stays, calling the original through
        if layer.owned:
            setattr(owner, name, layer.original)
        else:
            delattr(owner, name)
        del _layers[(owner, name)]


def patched(owner: Any, name: str) -> bool:
    """Whether our layer on `owner.name` is active."""
    with _lock:
        layer = _live(owner, name)
    return layer is not None and layer.active


def _live(owner: Any, name: str) -> _Layer | None:
    """Our layer on `owner.name` if it is still reachable there (on top, or under wrappers
    that keep `__wrapped__`); forgotten if someone else put the original back meanwhile, so a
    later `patch` installs a new layer instead of believing the lost one is active."""
    layer = _layers.get((owner, name))
    if layer is None:
        return None
    current = vars(owner).get(name, None)
    for _ in range(32):  # a chain of wrappers is short; a cycle must not hang us
        if current is layer.installed:
            return layer
        current = getattr(current, "__wrapped__", None)
        if current is None:
            break
    del _layers[(owner, name)]
    return None


# Where to patch and with what: (owner, attribute, `make` of `replace`).
Target = tuple[Any, str, Callable[[Any], Callable[..., Any]]]


class Patches:
    """One adapter's patches: `targets(module)` (which may do other setup) runs when `module`
    is first imported, or at once if it is, and each target is `replace`d; `uninstall` restores
    them all. `active` from install to uninstall: wrappers and the interceptors an adapter
    handed out check it, so they stop tracing with `uninstall`."""

    def __init__(self, module: str, targets: Callable[[ModuleType], Iterable[Target]]) -> None:
        self.module = module
        self.active = False
        self._targets = targets
        self._made: list[tuple[Any, str]] = []  # where our layers are, once made

    def idle(self) -> bool:
        """Neither installed nor waiting for the import: the next `install` takes its options."""
        return not self.active and not _imports.waiting(self.module)

    def install(self) -> None:
        """Patch when the module is imported (at once if it is, also when it came in through a
        finder ahead of ours while this waited). Idempotent."""
        if not self.active:
            _imports.when_imported(self.module, self._install)

    def _install(self, module: ModuleType) -> None:
        if self.active:
            return
        self.active = True
        for owner, name, make in self._targets(module):
            replace(owner, name, make)
            if (owner, name) not in self._made:
                self._made.append((owner, name))

    def uninstall(self) -> None:
        """Undo `install` (also a layer left inert under another's wrapper, gone since)."""
        _imports.cancel(self.module)
        self.active = False
        for owner, name in self._made:
            restore(owner, name)
