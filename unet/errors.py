"""Errors a user can cause: a bad flag, file, hostfile or data set.

Every such error is a ``UsageError`` (the other classes say which stage raised it). A command line
reports one as a single ``<prog>: error: ...`` line and exits with status 2 (``unet.cli``); anything
else is a bug and raises. Imports nothing of the package: anyone may raise these.
"""


class UsageError(Exception):
    """A mistake the user can fix; reported as one line, never a traceback.

    ``local``: found by this rank alone, without the ranks agreeing on it first, so this rank (not
    only rank 0) reports it."""

    def __init__(self, message: str, *, local: bool = False):
        super().__init__(message)
        self.local = local
