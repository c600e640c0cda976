#!/usr/bin/env python3
"""Nanoseconds per module call of the ways a forward callback can be attached, on a chain of no-op modules.

The chain's modules return their input, so a call is torch's `Module.__call__` plus the mechanism; the chain runs
inside a root module's forward (the attached model), one root call per pass. Two cases per mechanism: every module
of the chain watched (a no-op callback after each call), and only the root watched (what an unwatched module
inside the attached model pays: process-wide hooks run for every module call in the process).
Mechanisms: none; agent/dispatch.py as the agent uses it (a process-wide forward hook filtered by a table
lookup, and a process-wide pre-hook armed for the root's input and step clock only outside the root's forward);
the same with the pre-hook registered throughout (how dispatch.py worked before); a process-wide forward hook
alone with a bare filter; per-module `register_forward_hook` (stored on the modules); a per-instance forward
wrapper (`module.forward = wrapper` in the instance's __dict__, which keeps torch's fast path for unwatched
modules). Thread CPU time (time.thread_time) per block of calls, variants interleaved; fastest block and median,
per call.

    python bench/hook_mechanisms.py [--modules 200] [--rounds 7] [--passes 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from gradwatch.agent import dispatch


class Nothing(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _noop(*args: Any) -> None:
    return None


Install = Callable[[list[nn.Module]], Callable[[], None]]


class Root(nn.Module):
    """The attached model: runs the chain once per call."""

    def __init__(self, chain: list[nn.Module]) -> None:
        super().__init__()
        self.chain = nn.ModuleList(chain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.chain:
            x = m(x)
        return x


def _dispatch(watched: list[nn.Module]) -> Callable[[], None]:
    root, modules = watched[0], watched[1:]
    watches = [dispatch.watch_module(m, post=_noop) for m in modules]
    watches.append(dispatch.watch_module(root, pre=_noop, post=_noop))  # the root's input and step clock use a pre
    return lambda: [w.remove() for w in watches] and None


def _dispatch_pre_always(watched: list[nn.Module]) -> Callable[[], None]:
    """dispatch.py with its pre-hook in torch's table on every call (before arming): the same lookup, no disarm."""
    remove = _dispatch(watched)
    table = {id(watched[0]): watched[0]}

    def pre(module: Any, args: Any) -> None:
        if dispatch._is_compiling():
            return
        if table.get(id(module)) is module and not dispatch._other_than_compiling():
            _noop(module, args)

    handle = module_hooks.register_module_forward_pre_hook(pre)

    def remove_both() -> None:
        handle.remove()
        remove()

    return remove_both


def _global_post_only(watched: list[nn.Module]) -> Callable[[], None]:
    table = {id(m): m for m in watched}

    def hook(module: Any, args: Any, output: Any) -> None:
        if dispatch._is_compiling():
            return
        if table.get(id(module)) is module and not dispatch._other_than_compiling():
            _noop(module, args, output)

    handle = module_hooks.register_module_forward_hook(hook)
    return handle.remove


def _per_module(watched: list[nn.Module]) -> Callable[[], None]:
    handles = [m.register_forward_hook(_noop) for m in watched]
    return lambda: [h.remove() for h in handles] and None


def _wrapper(watched: list[nn.Module]) -> Callable[[], None]:
    for m in watched:
        forward = m.forward

        def wrapped(*args: Any, _forward: Any = forward, _m: nn.Module = m, **kwargs: Any) -> Any:
            out = _forward(*args, **kwargs)
            if not dispatch.stepping_aside():
                _noop(_m, args, out)
            return out

        m.forward = wrapped  # type: ignore[method-assign]

    def remove() -> None:
        for m in watched:
            del m.forward

    return remove


VARIANTS: dict[str, Install | None] = {
    "no hooks": None,
    "dispatch.py (post, pre armed at root)": _dispatch,
    "dispatch.py, pre always (before)": _dispatch_pre_always,
    "process-wide post only": _global_post_only,
    "per-module register_forward_hook": _per_module,
    "per-instance forward wrapper": _wrapper,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--passes", type=int, default=200)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    chain = [Nothing() for _ in range(opts.modules)]
    root = Root(chain)
    x = torch.ones(1)

    def run_chain() -> None:
        for _ in range(opts.passes):
            root(x)

    calls = opts.modules * opts.passes  # the root's own call adds 1 / modules to each, in every variant alike
    cases = {"all watched": [root, *chain], "only the root watched": [root]}
    samples: dict[tuple[str, str], list[float]] = {}
    run_chain()
    for r in range(opts.rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for case, watched in cases.items():
            for variant in order:
                install = VARIANTS[variant]
                remove = install(watched) if install is not None else None
                started = time.thread_time()
                with torch.enable_grad():
                    run_chain()
                samples.setdefault((variant, case), []).append((time.thread_time() - started) / calls * 1e9)
                if remove is not None:
                    remove()
    print(f"{opts.modules} no-op modules x {opts.passes} passes, {opts.rounds} rounds; ns per module call: "
          "fastest round (median)")  # fmt: skip
    print(f"{'mechanism':<40}" + "".join(f"{case:>28}" for case in cases))
    for variant in VARIANTS:
        row = [samples[(variant, case)] for case in cases]
        print(f"{variant:<40}" + "".join(f"{min(v):>18.0f} ({statistics.median(v):>5.0f})" for v in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
