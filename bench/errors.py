"""Errors that end a run with one clear line and exit code 2, before any compute."""


class ConfigError(ValueError):
    """Bad input: the message names the bad value and the valid ones."""


class DataNotFoundError(ConfigError):
    """A data set's files are missing and could not be downloaded."""
