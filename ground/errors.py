"""Errors that stop a run with one clear line (config or systemic faults)."""


class MmcurateError(Exception):
    """Base for faults the CLI reports as one line and a non-zero exit (``exit_code``)."""

    #: the CLI's exit status: 2 for config and storage errors (README "Exit codes of mmcurate run")
    exit_code = 2


class ConfigError(MmcurateError):
    """The configuration is invalid: names the file, the dotted key and the bad value."""


class StorageError(MmcurateError):
    """Object storage is unreachable, denied, or a path does not exist."""


class AccountingError(MmcurateError):
    """A shard's rows do not add up (rows_in != kept + rejected) at commit time."""


class TransientStorageError(MmcurateError):
    """Reading an object kept failing after retries (resets, timeouts, throttling).

    Deliberately not an ``OSError``: format code that treats ``OSError`` as bad bytes
    (tarfile, gzip, pyarrow) must never mistake a network fault for damage.
    """


class LockHeldError(MmcurateError):
    """Another run holds the output's lock (``OUT/_mmcurate/lock``); names the holder.

    Exit status 4, so a scheduler can tell "skipped: the previous run is still going" from a failure.
    """

    exit_code = 4


class StalledError(MmcurateError):
    """The Ray plan made no progress, or its model actors were not ready, within
    ``ray.no_progress_timeout_s`` (exit status 1)."""

    exit_code = 1


class RayConnectError(MmcurateError):
    """Ray at ``ray.address`` could not be reached within ``ray.connect_timeout_s``."""
