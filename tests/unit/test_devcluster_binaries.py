"""Which control-plane binaries the local cluster uses: a user's envtest binaries (KUBEBUILDER_ASSETS) first."""

from __future__ import annotations

from pathlib import Path

import devcluster
import pytest


def make_assets(directory: Path, names: tuple[str, ...]) -> Path:
    directory.mkdir()
    for name in names:
        executable = directory / name
        executable.write_text("#!/bin/sh\n")
        executable.chmod(0o755)
    return directory


def test_kubebuilder_assets_provide_etcd_apiserver_and_kubectl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assets = make_assets(tmp_path / "assets", ("etcd", "kube-apiserver", "kubectl"))
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets))
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    assert devcluster.binary("kube-apiserver") == assets / "kube-apiserver"
    assert devcluster.binary("etcd") == assets / "etcd"
    # The rest still comes from our own build, in the cache keyed by version.
    scheduler = devcluster.binary("kube-scheduler")
    assert scheduler.parent.name == "k8s-v1.36.3"
    assert scheduler.is_relative_to(tmp_path / "cache")
    k8s = next(component for component in devcluster.COMPONENTS if component.name == "k8s")
    needed = devcluster._needed_binaries(k8s)
    assert "kube-apiserver" not in needed
    assert "kubectl" not in needed
    assert "kube-scheduler" in needed


def test_incomplete_kubebuilder_assets_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assets = make_assets(tmp_path / "assets", ("etcd", "kube-apiserver"))
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets))
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    assert devcluster.binary("kube-apiserver").is_relative_to(tmp_path / "cache")
