"""User-facing errors: one line saying what is wrong and how to fix it.

The CLI prints these without a traceback and exits with code 2; anything else is a bug.
"""


class UserError(ValueError):
    """Bad input from the user (a config, a path, a file, an argument)."""


class ConfigError(UserError):
    """A model configuration that makes no sense."""


class CheckpointError(UserError):
    """A checkpoint folder or weight file that cannot be loaded."""


class MaskError(UserError):
    """A mask built from inconsistent inputs."""
