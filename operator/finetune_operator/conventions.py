"""The names the operator puts on its children and reads back: labels, annotations, container and resource names.

One place for each, so that the builders, the state machine, the watches and the tests agree, and no module
imports another only for a constant.
"""

from __future__ import annotations

from enum import StrEnum

# Labels on every child and pod template (Kubernetes' recommended labels, plus our own job key).
APP_NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
COMPONENT_LABEL = "app.kubernetes.io/component"
JOB_NAME_LABEL = "finetune.dev/job-name"
APP_NAME = "finetune-trainer"
MANAGER_NAME = "finetune-operator"

# Kueue manages a batch/v1 Job that carries its queue label, and admits it by unsuspending it.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

# Set by the Job controller on each pod of an Indexed Job: pod 0 runs the trainer's rank 0.
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

# The one container of every trainer pod (validation and training).
TRAINER_CONTAINER = "trainer"

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"


class Component(StrEnum):
    """What a child is for: the value of COMPONENT_LABEL."""

    INPUT = "input"
    VALIDATION = "validation"
    TRAINING = "training"
    RENDEZVOUS = "rendezvous"
