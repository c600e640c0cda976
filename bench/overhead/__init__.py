"""Helpers of bench/agent_overhead.py: the models (models.py), the variants compared (variants.py), the
interleaved timing rounds (rounds.py) and the tables, targets and JSON (report.py)."""
