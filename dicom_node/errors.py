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
