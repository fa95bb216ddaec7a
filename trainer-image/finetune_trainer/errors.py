"""User errors: bad inputs or bad data. The trainer reports them and exits with EXIT_USER_ERROR (never retried)."""

from __future__ import annotations

# Reasons a user can act on. The launcher maps a worker's error event with one of these to EXIT_USER_ERROR.
INVALID_INPUT = "InvalidInput"
INVALID_TRAINING_DATA = "InvalidTrainingData"
WEIGHTS_NOT_FOUND = "WeightsNotFound"
USER_ERROR_REASONS = frozenset((INVALID_INPUT, INVALID_TRAINING_DATA, WEIGHTS_NOT_FOUND))

# Anything else failed in the trainer itself (retried by the Job's backoffLimit).
TRAINER_FAILED = "TrainerFailed"


class UserError(Exception):
    """An error in what the user gave us: its message is shown to the user as it is."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
