"""The one place where an exception becomes text that is written (a dead letter, a log line).

Clinical input reaches parsers (json, csv, int(), pyarrow, pydicom, PIL, tokenizers), and their
exception texts quote what they choke on: ``invalid literal for int() with base 10: 'DOE^JOHN'``.
So an exception that touched input is described by its *type* and by words we wrote, never by
``str(exc)``. Code that finds a problem with a record itself raises :class:`InputError`, whose
message is ours by construction (written without interpolating any input value) and is kept.
"""

from __future__ import annotations


class InputError(ValueError):
    """A bad input record, described in our own words; the message never quotes the input.

    ``error_type`` is the dead letter's machine-readable reason (``bad_entities``, ...)."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type, self.message = error_type, message


def describe(exc: BaseException, what: str) -> str:
    """``what`` and, for an exception we raised about the input, our message; otherwise only the
    exception's type: ``describe(exc, "could not read file")`` -> ``"could not read file (OSError)"``."""
    if isinstance(exc, InputError):
        return f"{what}: {exc.message}" if what else exc.message
    return f"{what} ({type(exc).__name__})" if what else type(exc).__name__
