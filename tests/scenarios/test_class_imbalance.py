"""class_imbalance on a real run: 95 % of the labels are one class; caught once 500 labels were seen."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("torch")

from harness import assert_caught, run_scenario, scenario


def test_skewed_labels_are_caught_after_enough_samples() -> None:
    sc = scenario("class_imbalance")
    result = run_scenario(sc)
    # Labels are counted on full-statistics steps (64 every 10 steps): 500 are seen by step 80.
    assert_caught(result, "class_imbalance", within=90, allow=sc.allow)
    alert = result.first("class_imbalance")
    assert alert is not None and "class 0" in alert.summary, result.describe()
    seen = re.search(r"of (\d+) labels seen", alert.summary)
    assert seen is not None and int(seen.group(1)) >= 500, alert.summary  # judged only once enough were seen
    assert not result.fired("input_not_normalized")  # the inputs are centred: only the labels are at fault
