"""An S3-compatible server on loopback for tests and recordings: moto_server (the dev extra's `moto[server]`)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class S3Server:
    """A running test server: its endpoint, and what a client on this machine needs to reach it."""

    endpoint: str

    def env(self) -> dict[str, str]:
        """The AWS SDKs' and s3fs' variables for a process that uses the server."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def filesystem(self) -> Any:
        """An s3fs filesystem on the server (paths are `bucket/key`, without `s3://`)."""
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint,
            key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            skip_instance_cache=True,
        )


@contextmanager
def running_s3_server(*buckets: str) -> Iterator[S3Server]:
    """`s3_server` with `buckets` created in it."""
    with s3_server() as endpoint:
        server = S3Server(endpoint)
        filesystem = server.filesystem()
        for bucket in buckets:
            filesystem.mkdir(bucket)
        yield server
