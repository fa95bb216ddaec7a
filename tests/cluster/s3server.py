"""The local S3-compatible server (moto_server, from the dev extra's moto[server]) on loopback.

For the demo and the tests that move real data: the trainer reads its data and weights and writes its output
through fsspec/s3fs, as it would against S3, MinIO or Ceph.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testcluster import free_port

ACCESS_KEY = "local-access-key"
SECRET_KEY = "local-secret-key"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def env(self) -> dict[str, str]:
        """What a process on this machine needs to reach the server (the AWS SDKs' and s3fs' names)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    def filesystem(self) -> Any:
        """An s3fs filesystem on the server (paths are `bucket/key`, without `s3://`)."""
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint, key=ACCESS_KEY, secret=SECRET_KEY, skip_instance_cache=True
        )


@contextmanager
def running_s3_server(*buckets: str) -> Iterator[S3Server]:
    """moto_server on a free loopback port, with `buckets` created; stopped (and its data gone) on exit."""
    program = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if program is None:
        raise RuntimeError("moto_server is not installed (the dev extra's moto[server])")
    port = free_port()
    process = subprocess.Popen(
        [program, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"moto_server did not start on port {port}") from None
                time.sleep(0.1)
        server = S3Server(f"http://127.0.0.1:{port}")
        filesystem = server.filesystem()
        for bucket in buckets:
            filesystem.mkdir(bucket)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=30)
