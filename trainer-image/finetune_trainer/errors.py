"""User errors: bad inputs, bad data, or a run that cannot fit. Reported and ended with EXIT_USER_ERROR (never
retried, since a retry would fail the same way); the reasons are the ones users search for."""

from __future__ import annotations

INVALID_INPUT = "InvalidInput"
INVALID_TRAINING_DATA = "InvalidTrainingData"
WEIGHTS_NOT_FOUND = "WeightsNotFound"
DESTINATION_NOT_WRITABLE = "DestinationNotWritable"
OUT_OF_MEMORY = "OutOfMemory"
DESTINATION_IN_USE = "DestinationInUse"
USER_ERROR_REASONS = frozenset(
    (
        INVALID_INPUT,
        INVALID_TRAINING_DATA,
        WEIGHTS_NOT_FOUND,
        DESTINATION_NOT_WRITABLE,
        DESTINATION_IN_USE,
        OUT_OF_MEMORY,
    )
)

# Anything else failed in the trainer itself (retried by the Job's backoffLimit).
TRAINER_FAILED = "TrainerFailed"


class UserError(Exception):
    """An error in what the user gave us: its message is shown to the user as it is."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
