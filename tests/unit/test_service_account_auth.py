"""The operator authenticates as its ServiceAccount: the token goes out as a Bearer Authorization header.

kubernetes==36.0.0 (and 36.0.1) silently dropped it (kubernetes-client/python#2582, #2584): in a pod every call of
the operator went out as system:anonymous and was forbidden, while kopf's own watches (which read the token
themselves) still worked. tests/integration/test_chart_rbac.py shows it on a real API server; this shows it here.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from kubernetes import client, config
from kubernetes.config.incluster_config import InClusterConfigLoader


def bearer_token(configuration: client.Configuration) -> str | None:
    """The token in the Authorization header the client would send (the scheme's case does not matter)."""
    headers: dict[str, str] = {}
    client.ApiClient(configuration).update_params_for_auth(headers, [], ["BearerToken"])
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token if scheme.lower() == "bearer" else None


def test_in_cluster_service_account_token_is_sent_as_a_bearer_header(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("service-account-token")
    ca = tmp_path / "ca.crt"
    ca.write_text("a CA bundle")
    configuration = client.Configuration()
    environ = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    InClusterConfigLoader(str(token), str(ca), environ=environ).load_and_set(configuration)
    assert bearer_token(configuration) == "service-account-token"


def test_kubeconfig_token_is_sent_as_a_bearer_header(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"token": "kubeconfig-token"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    assert bearer_token(configuration) == "kubeconfig-token"
