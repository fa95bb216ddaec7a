"""Training data: fetch the JSONL files, check every row (with line numbers), split off the validation rows.

The row rules live in the contract (`finetune_contract.training_data`), shared with `kubectl ftj create`.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune_contract.inputs import TrainingInput
from finetune_contract.training_data import DataFormat, InvalidTrainingData, Row, Rows, describe, parse_rows
from finetune_trainer import storage
from finetune_trainer.errors import INVALID_INPUT, INVALID_TRAINING_DATA, UserError


@dataclass(frozen=True)
class Split:
    format: DataFormat
    train: list[Row]
    validation: list[Row]


def load_rows(uri: str, name: str) -> Rows:
    try:
        content = storage.read_bytes(uri)
    except (FileNotFoundError, IsADirectoryError) as error:
        raise UserError(INVALID_TRAINING_DATA, f"{name}: cannot read {uri}: not found") from error
    except PermissionError as error:
        raise UserError(INVALID_TRAINING_DATA, f"{name}: cannot read {uri}: permission denied") from error
    try:
        return parse_rows(content, name)
    except InvalidTrainingData as error:
        raise UserError(INVALID_TRAINING_DATA, str(error)) from error


def load_split(inputs: TrainingInput) -> Split:
    """Train and validation rows as Replicate takes them.

    Validation comes from the tail of train_data (removed from training), or from the head of validation_data
    when given; none when run_validation is off.
    """
    train = load_rows(inputs.train_data, "train_data")
    count = inputs.num_validation_samples if inputs.run_validation else 0
    if inputs.validation_data is not None:
        validation = load_rows(inputs.validation_data, "validation_data")
        if validation.format != train.format:
            raise UserError(
                INVALID_TRAINING_DATA,
                f"validation_data has {describe(validation.format)} rows but train_data has "
                f"{describe(train.format)} rows",
            )
        return Split(train.format, train.rows, validation.rows[:count])
    if count >= len(train.rows):
        raise UserError(
            INVALID_INPUT,
            f"num_validation_samples={count} leaves no training rows: train_data has {len(train.rows)} rows "
            "(lower num_validation_samples, give validation_data, or set run_validation: false)",
        )
    cut = len(train.rows) - count
    return Split(train.format, train.rows[:cut], train.rows[cut:])
