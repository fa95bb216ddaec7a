"""The three distributions and what each one pulls in, read from the installed metadata."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, distribution

from packaging.markers import Marker

OPERATOR_ONLY = {"kopf", "kubernetes", "prometheus-client"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(root: str) -> set[str]:
    """Every distribution `root` installs, without extras, as pip resolves them (markers for this interpreter)."""
    seen: set[str] = set()
    pending = [root]
    while pending:
        name = _canonical(pending.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = distribution(name).requires or []
        except PackageNotFoundError:
            continue  # a requirement whose marker excludes this platform is not installed
        for requirement in requirements:
            spec, _, marker = requirement.partition(";")
            if "extra ==" in marker or "extra==" in marker:
                continue
            if marker.strip() and not _marker_applies(marker):
                continue
            match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
            assert match is not None, requirement
            pending.append(match.group(1))
    return seen


def _marker_applies(marker: str) -> bool:
    return Marker(marker).evaluate({"extra": ""})


def test_trainer_image_install_pulls_no_operator_dependency() -> None:
    closure = dependency_closure("finetune-trainer")
    assert {"torch", "trl", "peft", "finetune-contract"} <= closure
    assert not closure & OPERATOR_ONLY
    assert "finetune-operator" not in closure


def test_contract_depends_on_pydantic_alone() -> None:
    closure = dependency_closure("finetune-contract") - {"finetune-contract"}
    assert "pydantic" in closure
    assert not closure & (OPERATOR_ONLY | {"torch", "transformers"})


def test_operator_install_pulls_no_trainer_stack() -> None:
    closure = dependency_closure("finetune-operator")
    assert {"kopf", "kubernetes", "finetune-contract"} <= closure
    assert not closure & {"torch", "transformers", "trl", "peft", "finetune-trainer"}
