"""The errors a user's input raises: each message is one line that names what is wrong. A leaf module, so that
any module can raise them without importing what they are about."""


class ConfigError(ValueError):
    """A config key or value is wrong; the message is one line that names it."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt, or cannot be written; the message names the file."""
