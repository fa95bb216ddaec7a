"""Operator settings, from FINETUNE_* environment variables (the Helm chart sets them)."""

from __future__ import annotations

from pydantic import Field, IPvAnyNetwork
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
        None, description="Base URI for output weights; a job writes under <base>/<namespace>/<name>/<uid>/."
    )
    validation_cpu: str = Field("2", description="CPU of the data validation pod.")
    validation_memory: str = Field("8Gi", description="Memory of the data validation pod.")
    validation_deadline_seconds: int = Field(
        3600, ge=60, description="The data validation Job fails (DeadlineExceeded) after this long."
    )
    lost_node_seconds: int = Field(
        120,
        ge=0,
        description="A trainer pod on a node that stops reporting (NotReady) is evicted after this long, and "
        "replaced 30 s after its grace period.",
    )
    stuck_pod_seconds: float = Field(
        600.0,
        gt=0,
        description="A trainer pod stuck this long on what cannot heal (image not found, a missing claim, Secret "
        "or ConfigMap, a volume that fails to mount) fails the job.",
    )
    trainer_service_account: str | None = Field(
        None,
        description="ServiceAccount of trainer pods (e.g. one bound to cloud storage by workload identity).",
    )
    checkpoint_every_minutes: float = Field(
        30.0,
        gt=0,
        description="Trainers save a checkpoint this often besides each epoch's end (a retry resumes there).",
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
    log_events_per_second: float = Field(
        20.0, gt=0, description="Most protocol events parsed per second per followed log (progress is coalesced)."
    )
    metrics_port: int = Field(8080, description="Prometheus metrics port.")
    health_stall_seconds: float = Field(
        300.0, gt=0, description="/healthz fails when queued work has not moved for this long."
    )
    workers: int = Field(8, ge=1, le=256, description="Reconciles that run at once.")
    api_pool_size: int = Field(16, ge=1, le=1024, description="Connections to the API server.")
    api_timeout_seconds: float = Field(30.0, gt=0, description="Timeout of each API request.")
    resync_seconds: float = Field(
        300.0, gt=0, description="How often every child is listed again, to catch what a broken watch missed."
    )
    # The chart sets these two from leaderElection.enabled and the release namespace.
    leader_election: bool = Field(False, description="Run only while holding the leader Lease.")
    leader_election_namespace: str = Field("default", description="Namespace of the leader Lease.")
    leader_election_id: str = Field("finetune-operator", description="Name of the leader Lease.")
    lease_duration_seconds: float = Field(15.0, gt=0, description="How long a leader's Lease lasts unrenewed.")
    renew_deadline_seconds: float = Field(10.0, gt=0, description="A leader that cannot renew this long steps down.")
    retry_period_seconds: float = Field(2.0, gt=0, description="How often candidates try to take or renew the Lease.")
    api_owner_namespaces: dict[str, str] = Field(
        default_factory=dict,
        description="Replicate API: the namespace of each destination owner whose namespace has another name "
        "(JSON object); other owners are namespaces of their own name.",
    )
    api_public_url: str | None = Field(
        None,
        description="Replicate API: its base URL as clients reach it, for the training objects' urls (in webhooks "
        "too); API responses otherwise use the request's own.",
    )
    webhook_signing_secret: str = Field(
        "finetune-webhook-signing-key",
        min_length=1,
        description="Name of the Secret (in each FineTuneJob's namespace) holding its webhook signing key; "
        "the only Secret name the operator may read.",
    )
    webhook_allowed_networks: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="Webhook URLs may reach these networks (CIDRs, JSON list) besides public addresses; loopback, "
        "link-local, private and cluster-internal addresses are refused otherwise.",
    )
