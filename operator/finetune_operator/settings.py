"""Operator settings, from FINETUNE_* environment variables (the Helm chart sets them)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from finetune_contract.trainer_config import ActivationCheckpointing
from finetune_operator.api.spec import DEFAULT_MODEL


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FINETUNE_", frozen=True)

    trainer_image: str = Field(
        "ghcr.io/finetune-operator/trainer:0.1.0", description="Trainer image when spec.image is not set."
    )
    model_weights: dict[str, str] = Field(
        default_factory=lambda: {DEFAULT_MODEL: "hf://meta-llama/Llama-2-7b-hf"},
        description="Base weights URI per model name, for specs without model.weights (JSON object).",
    )
    default_destination: str | None = Field(
        None, description="Base URI for output weights; a job writes under <base>/<namespace>/<name>/."
    )
    validation_cpu: str = Field("2", description="CPU of the data validation pod.")
    validation_memory: str = Field("8Gi", description="Memory of the data validation pod.")
    trainer_service_account: str | None = Field(
        None,
        description="ServiceAccount of trainer pods (e.g. one bound to cloud storage by workload identity).",
    )
    activation_checkpointing: ActivationCheckpointing = Field(
        "auto",
        description='Activation checkpointing in trainer pods: "auto" (planned from the model, GPU memory, micro '
        'batch and chunk size), "off", "all", or n for every n-th decoder layer.',
    )
    master_port: int = Field(29500, description="torch.distributed rendezvous port on pod 0.")
    progress_interval_seconds: float = Field(
        5.0, gt=0, description="Least time between two progress patches of one job's status."
    )
    log_tail_lines: int = Field(40, ge=1, le=500, description="Lines of the rank-0 log kept in status.logs.")
    log_tail_bytes: int = Field(8192, ge=256, le=65536, description="Most bytes of status.logs.")
    metrics_port: int = Field(8080, description="Prometheus metrics port.")
