"""The trainer's input file: what the operator mounts at TRAINER_CONFIG_PATH in every trainer pod."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune_contract.inputs import TrainingInput

TRAINER_CONFIG_PATH = "/etc/finetune/input.json"

# Which decoder layers recompute their activations in the backward pass: "auto" (the trainer's memory plan from
# the model's shape, the GPU's memory, micro batch and chunk size), "off", "all", or n for every n-th layer.
ActivationCheckpointing = Literal["auto", "off", "all"] | Annotated[int, Field(ge=1)]


class TrainerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    input: TrainingInput
    model_name: str = Field(description="Base model name, e.g. meta/llama-2-7b.")
    weights: str = Field(description="Base weights: hf://, https://, s3://, gs://, pvc:// URI or a local directory.")
    destination: str = Field(description="Where output weights go: s3://, gs://, pvc:// URI or a local directory.")
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=0, description="GPUs per node; 0 trains on the CPU, one process per node.")
    job: str = Field("", description="namespace/name of the FineTuneJob, for log lines and metadata.")
    run_uid: str = Field(
        "", description="The FineTuneJob's UID: part of the checkpoints' fingerprint, so no other run resumes them."
    )
    checkpoint_every_minutes: float | None = Field(
        30.0, gt=0, description="Save a checkpoint this often besides each epoch's end (None: only at epochs' end)."
    )
    activation_checkpointing: ActivationCheckpointing = Field(
        "auto", description='"auto" (the memory plan), "off", "all", or n: every n-th decoder layer.'
    )

    @property
    def processes_per_node(self) -> int:
        return max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node
