"""How kstatus (cli-utils, and Flux's health checks built on it) reads any resource it has no special rule for:
its documented generic algorithm, to check a FineTuneJob the way those tools see it.

InProgress while status.observedGeneration is behind metadata.generation or the Reconciling condition is True;
Failed when Stalled is True; Current otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def kstatus(obj: Mapping[str, Any]) -> str:
    status = obj.get("status") or {}
    generation = obj.get("metadata", {}).get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and observed is not None and observed < generation:
        return "InProgress"
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions", []) or []}
    if conditions.get("Reconciling") == "True":
        return "InProgress"
    if conditions.get("Stalled") == "True":
        return "Failed"
    return "Current"
