"""What GitOps tools read: Argo CD's health check (Lua, run with lupa) on sample FineTuneJobs, and the shipped
Argo CD and Flux manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from argocd_health import HEALTH_SCRIPT, argocd_health

from finetune_operator.api.status import FineTuneJobStatus, Phase, Progress

ROOT = Path(__file__).resolve().parents[2]
GITOPS = ROOT / "gitops"
ARGOCD_CM_KEY = "resource.customizations.health.finetune.dev_FineTuneJob"


def sample(status: FineTuneJobStatus | None, generation: int = 1) -> dict[str, Any]:
    """A FineTuneJob as the API server returns it, its status written from the operator's own model."""
    obj: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "bot", "namespace": "team-a", "generation": generation},
        "spec": {"input": {"train_data": "s3://bucket/train.jsonl"}},
    }
    if status is not None:
        obj["status"] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return obj


@pytest.mark.parametrize(
    ("phase", "health"),
    [
        (Phase.PENDING, "Progressing"),
        (Phase.VALIDATING, "Progressing"),
        (Phase.QUEUED, "Progressing"),
        (Phase.STARTING, "Progressing"),
        (Phase.RUNNING, "Progressing"),
        (Phase.SUSPENDED, "Suspended"),
        (Phase.SUCCEEDED, "Healthy"),
        (Phase.FAILED, "Degraded"),
        (Phase.CANCELED, "Degraded"),
    ],
)
def test_argocd_health_of_each_phase(phase: Phase, health: str) -> None:
    status = FineTuneJobStatus(phase=phase, reason="Why", message="because", observed_generation=1)
    assert argocd_health(sample(status)) == (health, f"{phase.value}: because")


def test_argocd_health_shows_the_step_of_a_running_job() -> None:
    status = FineTuneJobStatus(
        phase=Phase.RUNNING, message="the trainer is running", progress=Progress(step=40, total_steps=300)
    )
    assert argocd_health(sample(status)) == ("Progressing", "Running: the trainer is running (step 40 of 300)")


def test_argocd_health_waits_for_the_operator() -> None:
    assert argocd_health(sample(None)) == ("Progressing", "Waiting for the operator to report a phase")
    stale = FineTuneJobStatus(phase=Phase.SUCCEEDED, observed_generation=1)
    assert argocd_health(sample(stale, generation=2)) == (
        "Progressing",
        "Waiting for the operator to observe generation 2",
    )


def test_the_argocd_cm_snippet_carries_the_tested_script() -> None:
    snippet = yaml.safe_load((GITOPS / "argocd" / "argocd-cm.yaml").read_text())
    assert snippet["data"][ARGOCD_CM_KEY] == HEALTH_SCRIPT.read_text()


def test_the_argocd_cm_script_runs_as_argocd_runs_it() -> None:
    snippet = yaml.safe_load((GITOPS / "argocd" / "argocd-cm.yaml").read_text())
    failed = FineTuneJobStatus(phase=Phase.FAILED, message="train_data line 17: missing completion")
    assert argocd_health(sample(failed), script=snippet["data"][ARGOCD_CM_KEY])[0] == "Degraded"


@pytest.mark.parametrize("path", sorted(GITOPS.rglob("*.yaml")), ids=lambda path: path.name)
def test_each_gitops_manifest_parses_and_the_readme_shows_it(path: Path) -> None:
    documents = [document for document in yaml.safe_load_all(path.read_text()) if document]
    assert documents
    if path.name != "argocd-cm.yaml":
        assert all({"apiVersion", "kind", "metadata", "spec"} <= set(document) for document in documents)
    assert path.read_text() in (ROOT / "README.md").read_text(), f"README.md shows {path.relative_to(ROOT)} as it is"


def test_the_operator_manifests_install_this_repositorys_chart() -> None:
    argocd = yaml.safe_load((GITOPS / "argocd" / "application-operator.yaml").read_text())
    flux_release = list(yaml.safe_load_all((GITOPS / "flux" / "finetune-operator.yaml").read_text()))[1]
    chart_paths = [argocd["spec"]["source"]["path"], flux_release["spec"]["chart"]["spec"]["chart"].removeprefix("./")]
    assert all((ROOT / path / "Chart.yaml").exists() for path in chart_paths)
    values = yaml.safe_load((ROOT / "charts" / "finetune-operator" / "values.yaml").read_text())
    for given in (argocd["spec"]["source"]["helm"]["valuesObject"], flux_release["spec"]["values"]):
        assert set(given) <= set(values)
        for section, settings in given.items():
            assert set(settings) <= set(values[section])
