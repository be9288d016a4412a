"""The shared ground beneath operators and pipelines: errors, storage, output layout, row schema.

Imports run one way (STYLE.md 11): ``ground`` <- ``operators`` <- ``pipelines`` <- ``jobs``.
Nothing here imports Ray, torch or a higher layer.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("mmcurate")
except _metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"

# Bumped whenever a core column changes name, type or meaning.
SCHEMA_VERSION = "1"
