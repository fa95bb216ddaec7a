"""The FineTuneJob API (`finetune.dev/v1alpha1`): the single source of truth for the CRD in crds/."""

from finetune_operator.api.spec import FineTuneJobSpec, ModelSpec, Resources
from finetune_operator.api.status import Condition, ConditionType, FineTuneJobStatus, Phase

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ("ftj",)
# A FineTuneJob's name is a label value on its pods, so it obeys the label rule.
MAX_NAME_LENGTH = 63

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "MAX_NAME_LENGTH",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "VERSION",
    "Condition",
    "ConditionType",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "ModelSpec",
    "Phase",
    "Resources",
]
