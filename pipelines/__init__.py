"""Plans and runs mmcurate pipelines: the only code that talks to Ray Data's planner."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("mmcurate")
except _metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"

# Bumped whenever a core column changes name, type or meaning.
SCHEMA_VERSION = "1"
