"""Process-wide hooks that observe attached modules and optimizers without storing anything on them.

Why: a hook registered on a module lives in that module's `_forward_hooks` dict, so it travels with every
`pickle`, `torch.save(model)`, `copy.deepcopy(model)`, EMA/SWA copy and `torch.multiprocessing` spawn (our
hooks hold a sender thread and a queue: the copy fails, and a copy that succeeded would need gradwatch to
load). `torch.jit.script` compiles a module's hooks too. Instead this module registers ONE global forward
pre-hook, ONE global forward hook (`torch.nn.modules.module.register_module_forward_*`) and one global
optimizer step pre/post hook pair (`torch.optim.optimizer.register_optimizer_step_*`) while anything is
watched, and dispatches to the callbacks of the watched objects, found by `id()` and confirmed through a weak
reference. Nothing is stored on the user's modules, parameters or optimizers, so their copies carry no agent.

Stepping aside: the hooks do nothing (add no ops, keep no state) while torch.compile/dynamo or torch.export
traces (`torch.compiler.is_compiling()`, checked first, so dynamo folds the whole hook away: no graph break,
no guard on our tables), under `torch.jit.trace`, `torch.fx` symbolic tracing, make_fx tracing (fake or proxy
tensors), functorch transforms (`torch.func.vmap/grad`), and inside a backward pass (activation checkpointing
re-runs forwards there: observing them again would double the statistics).

Contract
- `watch_module(module, pre=..., post=..., first=False)` / `watch_optimizer(optimizer, pre=..., post=...)`
  return a `Watch`; `Watch.remove()` is idempotent. Callbacks get the hook arguments torch gives
  (`(module, args)`, `(module, args, output)`, `(optimizer, args, kwargs)`), must not raise (an exception is
  sent to errors.report) and never change what they observe: the global hooks always return None.
- Cost on every module call in the process while anything is watched: torch's hook path plus one dict
  lookup per global hook (bench/agent_overhead.py measures it); the global hooks go away with the last watch.
- Training thread(s) only for callbacks; registration is locked.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any, cast

import torch
from torch.nn.modules import module as _module_hooks
from torch.optim import optimizer as _optimizer_hooks

from gradwatch.agent import errors

__all__ = ["Watch", "is_watched", "stepping_aside", "watch_module", "watch_optimizer"]


def _never() -> bool:
    return False


# Each predicate where this torch has it (torch >= 2.4 is supported; some arrived later), else "never".
_is_compiling = torch.compiler.is_compiling
_is_exporting = getattr(torch.compiler, "is_exporting", _never)
_is_tracing = torch._C._is_tracing
_is_fx_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing",  # is_fx_tracing logs a deprecation
                         getattr(torch.fx._symbolic_trace, "is_fx_tracing", _never))  # fmt: skip
_graph_task_id = torch._C._current_graph_task_id
_interpreter_stack = torch._C._functorch.peek_interpreter_stack
_dispatch_mode = torch._C._get_dispatch_mode
_PROXY = torch._C._TorchDispatchModeKey.PROXY
_FAKE = torch._C._TorchDispatchModeKey.FAKE
#: torch warns on every `torch.compile(module)` wrapper call while any global module hook exists, because such a
#: hook would also fire for the wrapper. Ours fire only for watched modules (the wrapper never is), so the
#: warning says nothing true about them; this filter, scoped to that message, lives as long as our hooks.
_COMPILE_WARNING = r"Using `torch\.compile\(module\)` when there are global hooks on modules"


class _Entry:
    """The callbacks of one watched object (slots: looked up on every call of a watched module)."""

    __slots__ = ("first", "post", "post_kwargs", "pre", "pre_all", "ref")

    def __init__(self, ref: weakref.ref[Any]) -> None:
        self.ref = ref
        self.first: tuple[Callable[..., None], ...] = ()  # pre callbacks that run before the others
        self.pre: tuple[Callable[..., None], ...] = ()
        self.post: tuple[Callable[..., None], ...] = ()
        self.post_kwargs: tuple[Callable[..., None], ...] = ()  # called with the forward's keyword arguments
        self.pre_all: tuple[Callable[..., None], ...] = ()  # first + pre, kept by _set

    def _set(self, slot: str, callbacks: tuple[Callable[..., None], ...]) -> None:
        setattr(self, slot, callbacks)
        self.pre_all = self.first + self.pre


_lock = threading.Lock()
_modules: dict[int, _Entry] = {}
_optimizers: dict[int, _Entry] = {}
_module_handles: list[Any] = []
_optimizer_handles: list[Any] = []


def stepping_aside() -> bool:
    """Whether a tracer, compiler or transform is running, or a forward runs inside a backward pass (see the
    module docstring): then nothing may be observed."""
    return _is_compiling() or _other_than_compiling()


def _other_than_compiling() -> bool:
    """`stepping_aside()` for a hook that has already checked `_is_compiling()` (saves that call per module)."""
    return (
        _is_tracing()
        or _is_fx_tracing()
        or _is_exporting()
        or _graph_task_id() != -1
        or _interpreter_stack() is not None
        or _dispatch_mode(_PROXY) is not None
        or _dispatch_mode(_FAKE) is not None
    )


def _run(callbacks: tuple[Callable[..., None], ...], *args: Any) -> None:
    for callback in callbacks:
        try:
            callback(*args)
        except Exception as exc:  # callbacks report their own errors; this is the last line of defence
            errors.report(exc, "dispatch")


def _module_pre_hook(module: Any, args: Any) -> None:
    # Runs for every module call in the process: the cheap checks first (most modules have no entry, and most
    # watched ones have only post callbacks).
    if _is_compiling():  # first: dynamo folds it to True and traces nothing else here
        return
    entry = _modules.get(id(module))
    if entry is None or not entry.pre_all or entry.ref() is not module or _other_than_compiling():
        return
    _run(entry.pre_all, module, args)


def _module_hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
    if _is_compiling():
        return
    entry = _modules.get(id(module))
    if entry is None or not (entry.post or entry.post_kwargs) or entry.ref() is not module or _other_than_compiling():
        return
    _run(entry.post, module, args, output)
    if entry.post_kwargs:
        _run(entry.post_kwargs, module, args, kwargs, output)


def _optimizer_callback(optimizer: Any, post: bool, args: Any, kwargs: Any) -> None:
    """The watched optimizer's pre- or post-step callbacks (none while compiling or for another optimizer)."""
    if _is_compiling():
        return
    entry = _optimizers.get(id(optimizer))
    if entry is None or entry.ref() is not optimizer:
        return
    _run(entry.post if post else entry.pre, optimizer, args, kwargs)


def _optimizer_pre_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
    _optimizer_callback(optimizer, False, args, kwargs)


def _optimizer_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
    _optimizer_callback(optimizer, True, args, kwargs)


class Watch:
    """Callbacks registered for one object; `remove()` takes them off (and the global hooks with the last)."""

    def __init__(self, table: dict[int, _Entry], key: int, parts: dict[str, Callable[..., None]]) -> None:
        self._table = table
        self._key = key
        self._parts = parts

    def remove(self) -> None:
        with _lock:
            parts, self._parts = self._parts, {}
            entry = self._table.get(self._key)
            if entry is not None and parts:
                for slot, callback in parts.items():
                    entry._set(slot, tuple(c for c in getattr(entry, slot) if c is not callback))
                if not (entry.first or entry.pre or entry.post or entry.post_kwargs):
                    del self._table[self._key]
            _sync_global_hooks()


def _watch(table: dict[int, _Entry], target: Any, parts: dict[str, Callable[..., None] | None]) -> Watch:
    chosen = {slot: callback for slot, callback in parts.items() if callback is not None}
    key = id(target)
    with _lock:
        entry = table.get(key)
        if entry is None or entry.ref() is not target:  # new, or a dead object's id reused
            entry = table[key] = _Entry(weakref.ref(target))
        for slot, callback in chosen.items():
            entry._set(slot, (*getattr(entry, slot), callback))
        _sync_global_hooks()
    return Watch(table, key, chosen)


def watch_module(
    module: torch.nn.Module,
    *,
    pre: Callable[[Any, Any], None] | None = None,
    post: Callable[[Any, Any, Any], None] | None = None,
    post_kwargs: Callable[[Any, Any, Any, Any], None] | None = None,
    first: bool = False,
) -> Watch:
    """Call `pre(module, args)` before and `post(module, args, output)` (or `post_kwargs(module, args, kwargs,
    output)`) after each observed forward of `module`. `first=True`: `pre` runs before the callbacks
    registered without it."""
    parts = {"first" if first else "pre": pre, "post": post, "post_kwargs": post_kwargs}
    return _watch(_modules, module, parts)


def watch_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    pre: Callable[[Any, Any, Any], None] | None = None,
    post: Callable[[Any, Any, Any], None] | None = None,
) -> Watch:
    """Call `pre(optimizer, args, kwargs)` before and `post(...)` after each `optimizer.step()`."""
    return _watch(_optimizers, optimizer, {"pre": pre, "post": post})


def _sync_global_hooks() -> None:
    """Register the global hooks while something is watched, remove them when nothing is (under _lock)."""
    for dead in [key for key, entry in _modules.items() if entry.ref() is None]:
        del _modules[dead]
    if _modules and not _module_handles:
        _module_handles.append(_module_hooks.register_module_forward_pre_hook(_module_pre_hook))
        _module_handles.append(_module_hooks.register_module_forward_hook(_module_hook, with_kwargs=True))
        warnings.filterwarnings("ignore", message=_COMPILE_WARNING, category=UserWarning)
    elif not _modules and _module_handles:
        while _module_handles:
            handle = _module_handles.pop()
            handle.remove()
            # torch's handle does not take a with_kwargs hook out of this table; a stale id would keep
            # `torch.compile(module)` warning about global hooks after ours are gone.
            _module_hooks._global_forward_hooks_with_kwargs.pop(handle.id, None)
        # typeshed declares the filter list a Sequence; it is the list warnings.filterwarnings inserts into.
        cast("list[Any]", warnings.filters)[:] = [f for f in warnings.filters if not _is_compile_filter(f)]
    if _optimizers and not _optimizer_handles:
        _optimizer_handles.append(_optimizer_hooks.register_optimizer_step_pre_hook(_optimizer_pre_hook))
        _optimizer_handles.append(_optimizer_hooks.register_optimizer_step_post_hook(_optimizer_hook))
    elif not _optimizers:
        while _optimizer_handles:
            _optimizer_handles.pop().remove()


def _is_compile_filter(entry: Any) -> bool:
    action, message, category, _, _ = entry
    return action == "ignore" and category is UserWarning and getattr(message, "pattern", None) == _COMPILE_WARNING


def is_watched(target: Any) -> bool:
    """Whether any callback is registered for `target` (a module or an optimizer)."""
    entry = _modules.get(id(target)) or _optimizers.get(id(target))
    return entry is not None and entry.ref() is target
