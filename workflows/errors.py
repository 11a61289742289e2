"""What counts as a user error (bad input, a full disk), and keeping Dask quiet about them.

A user error ends the command with one line, ``rmac CMD: error: ...``, and a non-zero exit status; a
bug keeps its traceback. Errors raised inside Dask tasks reach the client as the same exception type,
but each worker also logs a multi-line "Compute Failed ... Traceback" block to stderr first:
`silence_user_errors` installs a worker plugin that drops that block for user errors only.
"""
from __future__ import annotations

import errno
import logging
import re

__all__ = ["UsageError", "ENV_ERRNOS", "user_error_types", "is_user_error", "describe", "silence_user_errors"]


class UsageError(ValueError):
    """Bad input found after argument parsing (values that only make sense together, file contents)."""


# OSErrors that say something about the user's paths or machine, not about the program.
ENV_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                        errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG,
                        errno.ELOOP, errno.EIO})
_OSERROR_NAMES = frozenset({"OSError", "IOError", "PermissionError", "FileNotFoundError", "FileExistsError",
                            "IsADirectoryError", "NotADirectoryError"})


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, not a bug (printed as one line)."""
    from rmac.storage.datasets import DatasetError
    from rmac.storage.images import BadImage, ImageListError
    from rmac.storage.store import StoreError
    from rmac.storage.weights import WeightsNotFound
    from rmac.workflows.search import QueryError

    return (UsageError, StoreError, QueryError, WeightsNotFound, DatasetError, BadImage, ImageListError)


def is_user_error(e: BaseException) -> bool:
    """A user error: one of `user_error_types`, or an OSError about paths, permissions or space."""
    if isinstance(e, user_error_types()):
        return True
    return isinstance(e, OSError) and e.errno in ENV_ERRNOS


def describe(e: BaseException) -> str:
    """One line for a user error (an OSError without its ``[Errno N]`` prefix)."""
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        where = " ".join(repr(str(f)) for f in (e.filename, e.filename2) if f is not None)
        text = f"{e.strerror}: {where}" if where else e.strerror
    else:
        text = str(e)
    return " ".join(text.split()) or type(e).__name__  # one line, whatever the message held


# ------------------------------------------------------------------------------------ quiet workers
_REPR = re.compile(r"^(\w+)\((\d+)?")


def _is_user_error_text(exception_text: str) -> bool:
    """Whether an exception ``repr`` (all a worker's log record holds) is a user error's."""
    m = _REPR.match(exception_text or "")
    if not m:
        return False
    name, code = m.group(1), m.group(2)
    if name in {t.__name__ for t in user_error_types()}:
        return True
    return name in _OSERROR_NAMES and code is not None and int(code) in ENV_ERRNOS


class _DropUserErrors(logging.Filter):
    """Drops distributed's "Compute Failed" record when the task raised a user error."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Compute Failed"):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        return not any(isinstance(a, str) and _is_user_error_text(a) for a in args[3:4])


def _install_filter() -> None:
    log = logging.getLogger("distributed.worker")
    if not any(isinstance(f, _DropUserErrors) for f in log.filters):
        log.addFilter(_DropUserErrors())


def silence_user_errors(client) -> None:
    """Keep every worker of ``client`` (and any that joins later) from logging user errors raised in
    tasks; real bugs are still logged in full. Also applies to this process's own workers' logger."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class QuietUserErrors(WorkerPlugin):
        name = "rmac-quiet-user-errors"

        def setup(self, worker) -> None:
            _install_filter()

    _install_filter()
    client.register_plugin(QuietUserErrors(), name=QuietUserErrors.name)
