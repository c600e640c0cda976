"""The server's settings schema machinery: `gradwatch.settings`, shared with the agent (re-exported here so the
server's modules and detectors import it from their own package)."""

from gradwatch.settings import (
    DEFAULT_MAX_FLOAT,
    DEFAULT_MAX_INT,
    SettingError,
    Settings,
    bounds,
    load_settings,
    setting,
)

__all__ = ["DEFAULT_MAX_FLOAT", "DEFAULT_MAX_INT", "SettingError", "Settings", "bounds", "load_settings", "setting"]
