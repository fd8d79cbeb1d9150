"""Errors a user can fix. The CLI prints their message on one line and exits with code 2."""


class WeightwiseError(ValueError):
    """A problem with the user's input (file, option, model) whose message says how to fix it."""


class OutputError(WeightwiseError):
    """An output that cannot be written: another process is writing it, the location is not writable or the disk is full."""
