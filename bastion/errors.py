"""The exceptions bastion raises: each message says what is wrong and what to do about it."""


class BastionError(Exception):
    """Base class: the CLI prints the message and exits non-zero, never a traceback."""


class ConfigError(BastionError):
    """The configuration file, environment or flags are invalid."""


class StoreError(BastionError):
    """The database is missing, unreadable or refused a change."""


class NotInitialized(BastionError):
    """The home directory has no config/database yet."""


class DamagedDatabase(StoreError):
    """The database file is there but SQLite cannot read it (not a database, malformed, unreadable): a problem
    found in the home, not bad input, so the CLI exits 1 (bad input exits 2)."""
