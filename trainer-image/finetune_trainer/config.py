"""The trainer's input file (`/etc/finetune/input.json`), read into the operator's TrainerConfig model."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from finetune_contract.trainer_config import TrainerConfig
from finetune_trainer.errors import INVALID_INPUT, UserError


def load_config(path: str | Path) -> TrainerConfig:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise UserError(INVALID_INPUT, f"input file {path} not found") from error
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(INVALID_INPUT, f"input file {path} is not valid JSON: {error}") from error
    try:
        return TrainerConfig.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'input'}: {problem['msg']}"
            for problem in error.errors()
        )
        raise UserError(INVALID_INPUT, f"invalid input file {path}: {problems}") from error
