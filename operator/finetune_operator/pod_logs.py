"""Container logs streamed over asyncio: a followed log costs a coroutine, not a thread.

Uses the kubernetes client's configuration (server, CA, client certificate or bearer token, refreshed as the
client refreshes it) with aiohttp, which kopf already runs on.
"""

from __future__ import annotations

import json
import ssl
from asyncio import sslproto
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from kubernetes.client import Configuration

# A line longer than this is cut: one runaway line must not hold the operator's memory.
MAX_LINE_BYTES = 64 * 1024
# asyncio gives every TLS connection a read buffer of SSLProtocol.max_size (256 KiB; CPython gh-109534). With one
# followed log per running job that buffer was most of the operator's memory per job; log chunks are small.
TLS_READ_BUFFER_BYTES = 32 * 1024


def limit_tls_read_buffer(size: int = TLS_READ_BUFFER_BYTES) -> None:
    """Make asyncio's TLS connections opened from now on read through a buffer of `size` bytes."""
    sslproto.SSLProtocol.max_size = min(size, sslproto.SSLProtocol.max_size)


class PodLogs:
    def __init__(self, configuration: Configuration, connect_timeout: float = 10.0) -> None:
        limit_tls_read_buffer()
        self._configuration = configuration
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None

    def _ssl(self) -> ssl.SSLContext | bool:
        cfg = self._configuration
        if not cfg.verify_ssl:
            return False
        context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        if cfg.cert_file:
            context.load_cert_chain(cfg.cert_file, cfg.key_file)
        return context

    def _headers(self) -> dict[str, str]:
        # The client's own auth settings (a bearer token, refreshed by its hook): the same header it would send.
        settings: dict[str, dict[str, Any]] = self._configuration.auth_settings()
        return {
            str(setting["key"]): str(setting["value"])
            for setting in settings.values()
            if setting.get("in") == "header" and setting.get("value")
        }

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl()), auto_decompress=True)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def lines(
        self,
        namespace: str,
        pod: str,
        container: str,
        since_time: str | None,
        idle_timeout: float,
        *,
        follow: bool = True,
    ) -> AsyncIterator[str]:
        """The container's log lines with their timestamps; `follow`: and new ones until the stream ends.

        Ends when the container stops, when the server closes the stream, or when nothing arrives for
        `idle_timeout` seconds (asyncio.TimeoutError). Without `follow`, at the end of what the log holds now.
        """
        params = {"container": container, "follow": str(follow).lower(), "timestamps": "true"}
        if since_time is not None:
            params["sinceTime"] = since_time
        url = f"{self._configuration.host}/api/v1/namespaces/{namespace}/pods/{pod}/log"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout, sock_read=idle_timeout)
        async with self._open().get(url, params=params, headers=self._headers(), timeout=timeout) as response:
            if response.status >= 400:
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status, message=await response.text()
                )
            pending = b""
            async for chunk in response.content.iter_chunked(16 * 1024):
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    yield line[:MAX_LINE_BYTES].decode("utf-8", errors="replace")
                if len(pending) > MAX_LINE_BYTES:
                    # Keep the head of a runaway line; drop the rest of it up to its newline.
                    yield pending[:MAX_LINE_BYTES].decode("utf-8", errors="replace")
                    pending = b""
                    async for rest in _rest_of_line(response.content):
                        pending = rest
                        break
            if pending:
                yield pending[:MAX_LINE_BYTES].decode("utf-8", errors="replace")

    async def container_terminated(self, namespace: str, pod: str, container: str) -> bool:
        """Whether the container has stopped for good (or its pod is gone)."""
        url = f"{self._configuration.host}/api/v1/namespaces/{namespace}/pods/{pod}"
        timeout = aiohttp.ClientTimeout(total=30, sock_connect=self._connect_timeout)
        async with self._open().get(url, headers=self._headers(), timeout=timeout) as response:
            if response.status == 404:
                return True
            response.raise_for_status()
            found: dict[str, Any] = json.loads(await response.read())
        for status in found.get("status", {}).get("containerStatuses", []) or []:
            if status.get("name") == container:
                return "terminated" in (status.get("state") or {})
        return found.get("status", {}).get("phase") in ("Succeeded", "Failed")


async def _rest_of_line(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Skip to the end of the current line; yields what follows its newline."""
    async for chunk in content.iter_chunked(16 * 1024):
        _, newline, after = chunk.partition(b"\n")
        if newline:
            yield after
            return
