"""Detectors: one module each, all listed in gradwatch.server.detectors.REGISTRY."""
