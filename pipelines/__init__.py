"""Plans and runs mmcurate pipelines: the only code that talks to Ray Data's planner."""

from ground import SCHEMA_VERSION, __version__  # noqa: F401  (re-exported for callers)
