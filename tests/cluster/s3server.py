"""An S3-compatible server on loopback for tests and recordings: moto_server (the dev extra's `moto[server]`)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kwokpods import WaitTimeout, wait_for
from testcluster import free_port

# moto accepts any credentials; these are what clients of the test server use.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3ServerFailed(RuntimeError):
    pass


@contextmanager
def s3_server(timeout: float = 30.0) -> Iterator[str]:
    """Run moto_server on a free loopback port; yields its endpoint URL (for AWS_ENDPOINT_URL_S3)."""
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if server is None:
        raise S3ServerFailed("moto_server is not installed (the dev extra's moto[server])")
    port = free_port()
    process = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def listening() -> bool:
        if process.poll() is not None:
            raise S3ServerFailed(f"moto_server exited with code {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    try:
        try:
            wait_for(listening, timeout=timeout, interval=0.2, description="moto_server to listen")
        except WaitTimeout as error:
            raise S3ServerFailed(f"moto_server did not start: {error}") from None
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
