"""Reproducible training scenarios (healthy runs and injected faults) and the harness that runs them
against a real embedded server: the detector test suite, the detection-quality bench and the demo share
them. Importing this package imports torch; `import gradwatch` does not import it.

* `gradwatch.scenarios.harness`: `run_training(...)` and its `RunResult` (API in its docstring).
* `gradwatch.scenarios.base`: `Scenario`, `Setup`, `run_scenario`, small models and data streams.
* `gradwatch.scenarios.catalogue`: every scenario (`SCENARIOS`, `scenario(name)`, `faults()`).
"""
