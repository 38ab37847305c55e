"""The one exception the program raises for bad input.

A :class:`QConsistencyError` carries a one-line message that names the file and
the problem; the command line prints it and exits with status 1, without a
traceback.
"""

from __future__ import annotations


class QConsistencyError(Exception):
    """Bad input or an impossible request, reported as one line to the user."""

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        text = " ".join(str(message).split())
        super().__init__(f"{path}: {text}" if path else text)


class OtherTableFormat(QConsistencyError):
    """A table in a format DIALS reads but the standalone reader does not
    (``kind``: "pickle" or "hdf5"): the native backend hands it to DIALS."""

    def __init__(self, message: str, path: str | None, kind: str):
        super().__init__(message, path)
        self.kind = kind


class GateFailed(Exception):
    """A fail_if bound was exceeded: exit status 2 with this one-line reason."""
