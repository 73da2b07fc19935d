"""Package exceptions. Every message names the file, field or constraint and the offending value."""


class EdgesplitError(Exception):
    """Base class of every error edgesplit raises on purpose."""


class ModelFormatError(EdgesplitError):
    """A GGUF file or model store is not something edgesplit can run (wrong architecture, type, layout)."""


class ChecksumError(ModelFormatError):
    """A file's bytes do not match the sha256 or size recorded for it."""


class StoreVersionError(ModelFormatError):
    """A model store was written by a format version this runtime does not know."""


class ModelNotFoundError(EdgesplitError):
    """A model name is unknown, or a path does not exist."""


class KVCacheOverflowError(EdgesplitError):
    """A step would write past the preallocated maximum sequence length."""


class ConfigError(EdgesplitError):
    """A setting (precision, segment bounds, sampler parameter) is out of range."""
