"""Where the trainer reads its data: https:// with TLS verified against the trust store, and s3:// at an
S3-compatible endpoint named by AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL."""

from __future__ import annotations

import http.server
import json
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from s3server import CREDENTIALS
from testcluster import free_port

from conftest import REPO_ROOT, learnable_rows, trainer_config, trainer_env, write_config, write_jsonl
from finetune_contract.protocol import EXIT_USER_ERROR, ErrorEvent, ValidatedEvent, parse_termination_message

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def certificate_authority() -> Any:
    import trustme

    return trustme.CA()


@pytest.fixture(scope="module")
def https_data(certificate_authority: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A static HTTPS server on loopback for `localhost`, with a certificate from the test CA; its base URL."""
    root = tmp_path_factory.mktemp("https-root")
    write_jsonl(root / "train.jsonl", learnable_rows(20))
    write_jsonl(root / "validation.jsonl", learnable_rows(6))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    certificate_authority.issue_cert("localhost").configure_cert(context)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _validate(config: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`finetune-trainer validate` as its own process, so that the trust store comes from its environment."""
    return subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "validate", "--input", str(config)],
        capture_output=True,
        text=True,
        env=trainer_env(tmp_path, **env),
        cwd=REPO_ROOT,
        timeout=180,
        check=False,
    )


def test_training_data_is_read_over_https_verified_against_the_trust_store(
    https_data: str, certificate_authority: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = trainer_config(tiny_model_dir, f"{https_data}/train.jsonl", tmp_path / "dest", num_validation_samples=4)
    config["input"]["validation_data"] = f"{https_data}/validation.jsonl"
    config_path = write_config(tmp_path / "in.json", config)
    ca_file = tmp_path / "ca.pem"
    certificate_authority.cert_pem.write_to_path(str(ca_file))

    trusted = _validate(config_path, tmp_path, SSL_CERT_FILE=str(ca_file))
    assert trusted.returncode == 0, trusted.stdout[-3000:] + trusted.stderr[-3000:]
    validated = parse_termination_message((tmp_path / "termination-log").read_text())
    assert isinstance(validated, ValidatedEvent)
    assert (validated.resolved.train_rows, validated.resolved.validation_rows) == (20, 4)
    assert json.loads(trusted.stdout)["train_rows"] == 20

    # A file the trusted server does not have is the user's error, and says so.
    config["input"]["validation_data"] = f"{https_data}/no-such.jsonl"
    missing = _validate(write_config(tmp_path / "in.json", config), tmp_path, SSL_CERT_FILE=str(ca_file))
    assert missing.returncode == EXIT_USER_ERROR
    assert parse_termination_message((tmp_path / "termination-log").read_text()) == ErrorEvent(
        reason="InvalidTrainingData", message=f"validation_data: cannot read {https_data}/no-such.jsonl: not found"
    )

    # The same server, not trusted: the certificate is checked, the data is not read, and a trust store that
    # lacks a CA is no fault in the user's data (retried, not exit code 65).
    untrusted = _validate(config_path, tmp_path, SSL_CERT_FILE=str(tmp_path / "no-ca.pem"))
    assert untrusted.returncode not in (0, EXIT_USER_ERROR)
    failed = parse_termination_message((tmp_path / "termination-log").read_text())
    assert isinstance(failed, ErrorEvent)
    assert failed.reason == "TrainerFailed"
    assert "CERTIFICATE_VERIFY_FAILED" in failed.message


@pytest.mark.parametrize(
    "endpoint_env",
    ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"],
)
def test_s3_data_is_read_at_the_endpoint_of_aws_endpoint_url_s3_else_aws_endpoint_url(
    endpoint_env: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fsspec
    import s3fs

    from finetune_trainer import storage

    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    # Where both are set, AWS_ENDPOINT_URL_S3 wins: the general one then points nowhere.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint if endpoint_env == "AWS_ENDPOINT_URL" else "http://127.0.0.1:9")
    monkeypatch.setenv(endpoint_env, s3_endpoint)
    fsspec.filesystem("s3").clear_instance_cache()
    bucket = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    bucket.mkdir(f"endpoint-{endpoint_env.lower().replace('_', '-')}")
    uri = f"s3://endpoint-{endpoint_env.lower().replace('_', '-')}/data/train.jsonl"
    content = "".join(json.dumps(row) + "\n" for row in learnable_rows(4)).encode()
    bucket.pipe(uri.removeprefix("s3://"), content)

    assert storage.read_bytes(uri) == content
    assert storage.exists(uri)
    storage.write_bytes(uri.replace("train.jsonl", "written.json"), b"{}")
    assert bucket.cat(uri.removeprefix("s3://").replace("train.jsonl", "written.json")) == b"{}"
