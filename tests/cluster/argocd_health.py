"""Argo CD's view of a FineTuneJob: the health check of gitops/argocd run as Argo CD runs it (Lua, `obj` global)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lupa

HEALTH_SCRIPT = Path(__file__).resolve().parents[2] / "gitops" / "argocd" / "finetunejob-health.lua"


def argocd_health(obj: Mapping[str, Any], script: str | None = None) -> tuple[str, str]:
    """(status, message) of the health check for the object as the API server returns it."""
    lua = lupa.LuaRuntime()
    lua.globals().obj = lua.table_from(dict(obj), recursive=True)
    result = lua.execute(script if script is not None else HEALTH_SCRIPT.read_text())
    return str(result.status), str(result.message)
