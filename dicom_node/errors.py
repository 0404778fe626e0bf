"""One exception root for the node, split into what a retry can fix and what it cannot."""


class NodeError(Exception):
    """dicom-node failed."""

    def __init__(self, message: str | None = None):
        super().__init__(message or self.__doc__)


class ConfigError(NodeError):
    """The configuration is invalid."""


class RetryableError(NodeError):
    """A transient failure: the same work may succeed later (PACS down, disk busy)."""


class PermanentError(NodeError):
    """A failure that retrying will not fix (corrupt pixel data, unsupported image)."""


class UnsupportedImage(PermanentError):
    """The image cannot be analysed by this node."""


class CheckpointError(ConfigError):
    """The detector checkpoint is missing or does not match the configured architecture."""


class QueueUnavailable(RetryableError):
    """The job database cannot be used right now (locked, disk full, I/O error, corrupt).

    `path` is the database file and `kind` a short reason; the message names both and
    never quotes SQL or its values. Whoever catches it answers "later" (0xA700 to a
    sender, a backoff in a loop); the work it was part of is not lost.
    """

    def __init__(self, path: str, kind: str):
        super().__init__(f"job database {path} unavailable: {kind}")
        self.path = path
        self.kind = kind
