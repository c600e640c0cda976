"""agent/dispatch.py: the process-wide pre-hook is in torch's table only while a module with pre callbacks is
armed, i.e. outside that module's own calls, and pre callbacks still run before every outermost call of it.

Generated programs of calls (plain, raising, nested in themselves, under no_grad, of another module, from inside
a sibling's forward) are run against the real global hook tables; what each call observes is compared with the
rule written out in the test (`expected`)."""

from __future__ import annotations

import contextlib

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules import module as module_hooks

from gradwatch.agent import dispatch


def _pre_hook_registered() -> bool:
    return dispatch._module_pre_hook in module_hooks._global_forward_pre_hooks.values()


class Probe(nn.Module):
    """Records, at each call, whether the global pre-hook is registered; raises or calls `root` when told to."""

    def __init__(self, log: list[bool]) -> None:
        super().__init__()
        self.log = log
        self.fail = False
        self.inner: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(_pre_hook_registered())
        if self.fail:
            raise RuntimeError("probe failure")
        if self.inner is not None:
            inner, self.inner = self.inner, None
            x = inner(x)
        return x


CALLS = st.lists(st.sampled_from(["root", "raise", "nested", "no_grad", "other", "other_calls_root"]), max_size=12)


@settings(max_examples=60, deadline=None)
@given(CALLS)
def test_pre_callbacks_run_at_each_outermost_call_and_the_hook_is_gone_inside(calls: list[str]) -> None:
    log: list[bool] = []
    probe = Probe(log)
    root = nn.Sequential(nn.Linear(3, 3), probe)
    other_probe = Probe([])
    other = nn.Sequential(other_probe)
    pre_seen: list[int] = []
    post_seen: list[int] = []
    watches = [
        dispatch.watch_module(root, pre=lambda m, a: pre_seen.append(1), post=lambda m, a, o: post_seen.append(1)),
        dispatch.watch_module(root[0], post=lambda m, a, o: None),  # a watched submodule with post callbacks only
    ]
    try:
        assert _pre_hook_registered()
        x = torch.ones(2, 3)
        expected_pre = expected_post = 0
        for call in calls:
            log.clear()
            if call == "root":
                root(x)
                expected_pre, expected_post = expected_pre + 1, expected_post + 1
                assert log == [False]  # inside the watched root's forward: no pre-hook on the module calls
            elif call == "raise":
                probe.fail = True
                with contextlib.suppress(RuntimeError):
                    root(x)
                probe.fail = False
                expected_pre += 1  # ran before the call; no post callback for a forward that raised
                assert log == [False]
            elif call == "nested":  # the root calls itself from inside its forward: seen once, at the outer call
                probe.inner = root
                root(x)
                expected_pre, expected_post = expected_pre + 1, expected_post + 2
                assert log[0] is False
            elif call == "no_grad":
                with torch.no_grad():
                    root(x)
                expected_pre, expected_post = expected_pre + 1, expected_post + 1
            elif call == "other":  # an unwatched model outside the root's forward pays the armed pre-hook
                other(x)
                assert other_probe.log[-1] is True
            else:  # the root called from inside another model's forward
                other_probe.inner = root
                other(x)
                expected_pre, expected_post = expected_pre + 1, expected_post + 1
                assert log == [False]
            assert _pre_hook_registered()  # armed again after every call, raising or not
            assert (len(pre_seen), len(post_seen)) == (expected_pre, expected_post)
    finally:
        for watch in watches:
            watch.remove()
    assert not _pre_hook_registered() and not module_hooks._global_forward_hooks


def test_two_watched_roots_each_disarm_only_themselves() -> None:
    log_a: list[bool] = []
    log_b: list[bool] = []
    a, b = nn.Sequential(Probe(log_a)), nn.Sequential(Probe(log_b))
    seen: list[str] = []
    watches = [dispatch.watch_module(a, pre=lambda m, x: seen.append("a")),
               dispatch.watch_module(b, pre=lambda m, x: seen.append("b"))]  # fmt: skip
    try:
        x = torch.ones(1)
        a(x)
        b(x)
        # b is still armed while a runs (and the other way round): the pre-hook stays for the other's sake.
        assert log_a == [True] and log_b == [True] and seen == ["a", "b"]
        watches.pop().remove()  # b no longer watched: a alone decides
        a(x)
        assert log_a == [True, False] and seen == ["a", "b", "a"]
    finally:
        for watch in watches:
            watch.remove()
    assert not _pre_hook_registered()


def test_module_without_pre_callbacks_never_registers_the_pre_hook() -> None:
    log: list[bool] = []
    model = nn.Sequential(Probe(log))
    watch = dispatch.watch_module(model, post=lambda m, a, o: None)
    try:
        assert not _pre_hook_registered()
        model(torch.ones(1))
        assert log == [False] and not _pre_hook_registered()
    finally:
        watch.remove()
