"""Exception types. The library raises these; only the CLI turns them into one-line messages.

Each subclasses a built-in so callers can catch either (as LanceDB does with MissingColumnError(KeyError)).
"""


class EmbedstoreError(Exception):
    """Base class for every error embedstore raises on purpose (bad input, bad state)."""


class StoreNotFoundError(EmbedstoreError, FileNotFoundError):
    """The store directory does not exist or is not an embedstore store."""


class StoreLockedError(EmbedstoreError, TimeoutError):
    """Another process holds the store's write lock."""


class UnknownBackboneError(EmbedstoreError, ValueError):
    """A backbone name that the registry cannot parse or does not know."""


class BackboneMismatchError(EmbedstoreError, ValueError):
    """A backbone other than the store's own was asked for."""


class BackboneLoadError(EmbedstoreError, RuntimeError):
    """Weights could not be loaded (no network, wrong file, shape mismatch)."""


class EmptyInputError(EmbedstoreError, ValueError):
    """Nothing to do: no image files in the given paths, no labels, ..."""


class NoImagesAddedError(EmbedstoreError, RuntimeError):
    """Every file given was unreadable; nothing could be added."""


class NotSupportedError(EmbedstoreError, ValueError):
    """The operation needs something this store's backbone does not have (e.g. a text tower)."""


class InvalidArgumentError(EmbedstoreError, ValueError):
    """A bad argument value (unknown id, bad filter, bad factory string, ...)."""


class CorruptStoreError(EmbedstoreError, ValueError):
    """The store's manifest is unreadable or inconsistent (truncated, empty, missing keys, unknown active version)."""


class StoreFormatError(EmbedstoreError, ValueError):
    """The store was written in a format this embedstore does not know (made by a newer embedstore)."""


class StoreNotWritableError(EmbedstoreError, PermissionError):
    """The user may read the store but not write it (permissions, a read-only file system)."""


def error_text(e: BaseException) -> str:
    """How a file that could not be read is described in the errors table: 'Type: first line' (300 chars at most)."""
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]
