"""gradwatch server: ingest, detectors, alerts and metrics. Never imports torch."""
