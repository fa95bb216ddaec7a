"""Followed logs: what one open TLS stream costs the operator in memory."""

from __future__ import annotations

import asyncio
import ssl
import tracemalloc
from pathlib import Path

import trustme
from aiohttp import web
from kubernetes.client import Configuration

from finetune_operator.pod_logs import TLS_READ_BUFFER_BYTES, PodLogs

STREAMS = 20


async def _open_streams(url: str, pod_logs: PodLogs, count: int) -> list[object]:
    session = pod_logs._open()
    return [await session.get(url) for _ in range(count)]


def test_an_open_log_stream_holds_a_small_tls_read_buffer(tmp_path: Path) -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))

    async def follow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"2026-11-30T12:00:00Z started\n")
        await asyncio.sleep(3600)  # a log that keeps its stream open, as a running trainer's does
        return response

    async def scenario() -> int:
        app = web.Application()
        app.router.add_get("/log", follow)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
        await site.start()
        port = runner.addresses[0][1]
        configuration = Configuration(host=f"https://127.0.0.1:{port}")
        configuration.ssl_ca_cert = str(ca_file)
        pod_logs = PodLogs(configuration)
        url = f"https://127.0.0.1:{port}/log"
        try:
            await _open_streams(url, pod_logs, 2)  # the session and the TLS context, paid once
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            streams = await _open_streams(url, pod_logs, STREAMS)
            held = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            assert len(streams) == STREAMS
            return held // STREAMS
        finally:
            await pod_logs.close()
            await runner.cleanup()

    per_stream = asyncio.run(scenario())
    # Both ends of each stream are in this process. asyncio's default read buffer alone is 256 KiB an end.
    assert per_stream < 2 * TLS_READ_BUFFER_BYTES + 32 * 1024, f"{per_stream} bytes per open stream"
