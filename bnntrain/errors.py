"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Something in the user's input is wrong; the message says what and what is expected."""


class ConfigError(UserError):
    """A config value is invalid."""


class DataError(UserError):
    """A dataset is missing or laid out differently from what the data preset expects."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or does not fit the model."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""
