"""The operator's Helm chart as tests see it: the helm binary that devcluster builds, and the chart rendered.

`helm_binary()` looks where `devcluster.py build` puts helm (the same cache and env as the cluster's binaries),
then at `$HELM`, then on PATH. `render_chart` runs `helm template` and returns the objects it renders.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import devcluster as dc
import yaml

CHART_DIR = dc.REPO_ROOT / "charts" / "finetune-operator"
DEFAULT_RELEASE = "finetune-operator"
DEFAULT_NAMESPACE = "finetune-system"


class HelmFailed(RuntimeError):
    """helm exited non-zero; the message carries its output."""


def helm_binary() -> Path | None:
    """The helm that `devcluster.py build` built, else `$HELM`, else helm on PATH; None when there is none."""
    candidates = [dc.binary("helm"), os.environ.get("HELM"), shutil.which("helm")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def _helm(*args: str, values: Mapping[str, Any] | None = None, timeout: float = 120) -> str:
    helm = helm_binary()
    if helm is None:
        raise HelmFailed("no helm binary: run `make cluster-binaries` (tests/cluster/devcluster.py build)")
    with tempfile.TemporaryDirectory(prefix="helmchart-") as scratch:
        values_file = Path(scratch) / "values.yaml"
        values_file.write_text(yaml.safe_dump(dict(values or {})))
        # helm keeps its own cache and config; keep them out of the user's home.
        env = {
            **os.environ,
            "HELM_CACHE_HOME": str(Path(scratch) / "cache"),
            "HELM_CONFIG_HOME": str(Path(scratch) / "config"),
            "HELM_DATA_HOME": str(Path(scratch) / "data"),
        }
        result = subprocess.run(
            [str(helm), *args, "--values", str(values_file)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    if result.returncode != 0:
        raise HelmFailed(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def lint_chart(values: Mapping[str, Any] | None = None, *, chart: Path = CHART_DIR) -> str:
    """`helm lint --strict`; returns its report, raises HelmFailed on any error or warning."""
    return _helm("lint", "--strict", str(chart), values=values)


def render_chart_text(
    values: Mapping[str, Any] | None = None,
    *,
    release: str = DEFAULT_RELEASE,
    namespace: str = DEFAULT_NAMESPACE,
    chart: Path = CHART_DIR,
) -> str:
    """`helm template` output: the chart's templates (not its crds/), as YAML documents."""
    return _helm("template", release, str(chart), "--namespace", namespace, values=values)


def render_chart(
    values: Mapping[str, Any] | None = None,
    *,
    release: str = DEFAULT_RELEASE,
    namespace: str = DEFAULT_NAMESPACE,
    chart: Path = CHART_DIR,
) -> list[dict[str, Any]]:
    """The objects `helm template` renders, in its order."""
    text = render_chart_text(values, release=release, namespace=namespace, chart=chart)
    return [document for document in yaml.safe_load_all(text) if document]
