"""The names and labels of a FineTuneJob's children: pure functions of the FineTuneJob's name."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from finetune_operator.conventions import (
    APP_NAME,
    APP_NAME_LABEL,
    COMPONENT_LABEL,
    INSTANCE_LABEL,
    JOB_NAME_LABEL,
    MANAGED_BY_LABEL,
    MANAGER_NAME,
    Component,
)


@dataclass(frozen=True)
class WorkloadNames:
    config_map: str
    validation_job: str
    train_job: str
    service: str


_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS_LABEL_LENGTH = 63
# The longest suffix is "-validate"; "-train" plus an Indexed pod's "-<index>" (nodes <= 64) is no longer.
_NAME_BASE_LENGTH = _DNS_LABEL_LENGTH - len("-validate")
_DIGEST_LENGTH = 8


def workload_names(ftj_name: str) -> WorkloadNames:
    """Child names that stay valid DNS labels (Service names, pod hostnames) for any FineTuneJob name.

    A name that is too long, or not a DNS label itself (dots, a leading digit), is shortened and made
    unique again with a hash of the full name.
    """
    base = ftj_name
    if len(ftj_name) > _NAME_BASE_LENGTH or not _DNS_LABEL.fullmatch(ftj_name):
        cleaned = re.sub(r"[^a-z0-9-]+", "-", ftj_name.lower()).strip("-")
        if not cleaned[:1].isalpha():
            cleaned = f"ftj-{cleaned}"
        stem = cleaned[: _NAME_BASE_LENGTH - _DIGEST_LENGTH - 1].rstrip("-")
        base = f"{stem}-{_digest(ftj_name)}"
    return WorkloadNames(
        config_map=f"{base}-input",
        validation_job=f"{base}-validate",
        train_job=f"{base}-train",
        service=f"{base}-workers",
    )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_DIGEST_LENGTH]


def component_selector(ftj_name: str, component: Component) -> dict[str, str]:
    """Labels that select one component's objects (or pods) of one FineTuneJob."""
    return {JOB_NAME_LABEL: ftj_name, COMPONENT_LABEL: component.value}


def child_labels(ftj_name: str, component: Component) -> dict[str, str]:
    """The labels on every child and pod template."""
    return {
        APP_NAME_LABEL: APP_NAME,
        INSTANCE_LABEL: ftj_name,
        MANAGED_BY_LABEL: MANAGER_NAME,
        **component_selector(ftj_name, component),
    }
