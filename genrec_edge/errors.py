"""The small error hierarchy the CLI turns into one line on stderr and an exit code."""


class GenrecError(Exception):
    """Base class: a problem the user can act on. The CLI prints ``error: <message>`` and exits non-zero."""

    exit_code = 1


class UsageError(GenrecError):
    """Bad arguments or options."""

    exit_code = 2


class DatabaseError(GenrecError):
    """Missing, corrupt, locked or read-only database, or a schema we do not know."""

    exit_code = 3


class DatabaseUnavailableError(DatabaseError):
    """The database is fine but cannot be written now: locked by another writer past the busy timeout, or
    read-only. A service answers 503 (retry later) rather than 500."""


class NotFoundError(GenrecError):
    """Unknown user, item or file."""

    exit_code = 4


class UnknownItemError(NotFoundError):
    """An ``exclude`` / ``only`` item id outside the catalog: ``item`` is the id, ``field`` which list."""

    def __init__(self, message: str, item: int | None = None, field: str | None = None):
        super().__init__(message)
        self.item, self.field = item, field

    def __reduce__(self):  # a worker process's error reaches the parent whole (pickle passes ``args`` alone)
        return type(self), (str(self), self.item, self.field)


class EmptyHistoryError(GenrecError):
    """The user exists but has no history to recommend from."""

    exit_code = 5


class IngestError(GenrecError):
    """Malformed input data; the message names the file and line."""

    exit_code = 6


class CorruptModelError(GenrecError):
    """A model file that is truncated, corrupt, foreign or unsupported."""

    exit_code = 7


class CatalogMismatchError(GenrecError):
    """A model trained for another catalog than the database's."""

    exit_code = 8


class GrammarError(GenrecError):
    """A GBNF grammar that would crash or dead-end llama.cpp."""

    exit_code = 9


class DownloadError(GenrecError):
    """A download that failed or whose checksum does not match."""

    exit_code = 10


class QuantizeError(GenrecError):
    """llama.cpp's quantizer failed (non-zero return code)."""

    exit_code = CorruptModelError.exit_code


class EngineError(GenrecError):
    """llama.cpp refused an operation (a decode failed, the context is too small)."""

    exit_code = 11


class WorkerLostError(EngineError):
    """A worker process of a :class:`~genrec_edge.pool.RecommenderPool` died during a call (it was replaced:
    the call may be retried)."""


class SearchCancelled(GenrecError):
    """The caller's ``cancel`` callable said the answer is no longer wanted (the HTTP client disconnected):
    the search stopped between two llama.cpp calls. The stopped group's answers are not cached (groups of
    ``batch`` finished before it are), and the next search is unaffected."""


def stop_if_cancelled(cancel) -> None:
    """Raise :class:`SearchCancelled` when ``cancel`` (a callable, or None: never) says so."""
    if cancel is not None and cancel():
        raise SearchCancelled("cancelled: the answer is no longer wanted")


class UnsupportedCPUError(GenrecError):
    """The installed llama.cpp was built with instructions this CPU/OS cannot execute."""

    exit_code = 13  # 12 is BenchError


class FileAccessError(GenrecError):
    """A file or folder the command cannot read or write: a directory where a file belongs (or the reverse),
    a missing parent folder, no permission, a full disk. ``cli.main`` turns any ``OSError`` into one."""

    exit_code = 14


class BenchError(GenrecError):
    """A ``python -m bench.run`` measurement child failed; the message carries its last error line.

    Its code is 12 (the bench's code came first; ``UnsupportedCPUError`` is 13).
    """

    exit_code = 12


def refuse_options(names, where: str) -> None:
    """UsageError "--a, --b apply to WHERE" when options were given where they would be ignored (none: fine)."""
    names = list(names)
    if names:
        raise UsageError(f"{', '.join(names)} appl{'ies' if len(names) == 1 else 'y'} to {where}")
