"""output_collapse on a real run: a loader bug repeats one sample across every batch, so the model answers the
same for the whole batch."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from harness import assert_caught, run_scenario, scenario


def test_one_output_for_the_whole_batch_is_caught() -> None:
    sc = scenario("stuck_batch")
    result = run_scenario(sc)
    assert_caught(result, "output_collapse", within=50, allow=sc.allow)
    alert = result.first("output_collapse")
    assert alert is not None and alert.layer == "output" and "same output" in alert.summary, result.describe()
