"""Replicate's training inputs for Llama 2 7B, with Replicate's names and defaults, verbatim.

A user can paste the `input` object of a `replicate.trainings.create(...)` call into `spec.input`.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from finetune_contract.uris import DataURI

MAX_CHUNK_SIZE = 32768

_CROSS_FIELD_RULES: list[JsonValue] = [
    {
        "rule": "self.micro_batch_size <= self.train_batch_size",
        "message": "micro_batch_size must not exceed train_batch_size",
        "fieldPath": ".micro_batch_size",
    },
    {
        "rule": "!self.wrap_packed_sequences || self.pack_sequences",
        "message": "wrap_packed_sequences needs pack_sequences: true",
        "fieldPath": ".wrap_packed_sequences",
    },
]


class TrainingInput(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"x-kubernetes-validations": _CROSS_FIELD_RULES},
    )

    train_data: DataURI = Field(
        description='JSONL training data: rows {"text"} or {"prompt", "completion"}. '
        "https://, s3://, gs:// or pvc://claim/path."
    )
    num_train_epochs: int = Field(3, ge=1, le=1000, description="Passes over the training data.")
    train_batch_size: int = Field(4, ge=1, le=65536, description="Global batch size (all GPUs together).")
    micro_batch_size: int = Field(4, ge=1, le=65536, description="Largest per-GPU batch per forward pass.")
    num_validation_samples: int = Field(
        50,
        ge=0,
        description="Validation rows: from the tail of train_data (and removed from training), "
        "or from the head of validation_data when given.",
    )
    validation_data: DataURI | None = Field(None, description="Optional JSONL validation data, like train_data.")
    validation_batch_size: int = Field(1, ge=1, le=65536, description="Per-GPU batch size for validation.")
    run_validation: bool = Field(True, description="Compute the validation loss after each epoch.")
    validation_prompt: str | None = Field(
        None,
        max_length=8192,
        description="A prompt whose completion is generated at each validation and shown in status.",
    )
    learning_rate: float = Field(1e-4, gt=0, le=1, description="Peak learning rate.")
    pack_sequences: bool = Field(
        False, description="Pack examples into chunk_size-token sequences (no attention across examples)."
    )
    wrap_packed_sequences: bool = Field(
        False,
        description="With pack_sequences: wrap examples across sequence boundaries for constant length.",
    )
    chunk_size: int = Field(2048, ge=1, le=MAX_CHUNK_SIZE, description="Tokens per (packed) sequence.")
    peft_method: Literal["lora", "qlora"] = Field("lora", description="LoRA, or QLoRA on a 4-bit NF4 base.")
    seed: int = Field(42, description="Random seed: initialisation and data order.")
    lora_rank: int = Field(8, ge=1, le=1024, description="Rank of the LoRA update matrices.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling: updates are scaled by lora_alpha / lora_rank.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")

    @model_validator(mode="after")
    def _check_cross_field_rules(self) -> Self:
        # The same rules as the CRD's CEL, for inputs that reach the trainer without the API server.
        if self.micro_batch_size > self.train_batch_size:
            raise ValueError("micro_batch_size must not exceed train_batch_size")
        if self.wrap_packed_sequences and not self.pack_sequences:
            raise ValueError("wrap_packed_sequences needs pack_sequences: true")
        return self
