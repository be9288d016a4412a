"""Errors that stop a run with one clear line (config or systemic faults)."""


class MmcurateError(Exception):
    """Base for faults the CLI reports as one line and a non-zero exit."""


class ConfigError(MmcurateError):
    """The configuration is invalid: names the file, the dotted key and the bad value."""


class StorageError(MmcurateError):
    """Object storage is unreachable, denied, or a path does not exist."""


class AccountingError(MmcurateError):
    """A shard's rows do not add up (rows_in != kept + rejected) at commit time."""
