"""The HTTP routes of Replicate's trainings API, on aiohttp (kopf's own HTTP stack and event loop).

    POST /v1/models/{owner}/{name}/versions/{version}/trainings   create (201)
    GET  /v1/trainings/{id}                                      get
    GET  /v1/trainings                                           list, newest first, cursor pages
    POST /v1/trainings/{id}/cancel                               cancel

Errors are JSON as Replicate writes them (`title`, `detail`, `status`; a 422 also lists `invalid_fields`):
no token or a token the API server rejects 401, no right 403, a bad body 422 naming the field, never a 500 for
bad input. The Kubernetes client is synchronous: its calls run on worker threads.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import signal
import string
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web

from finetune_operator.replicate_api import mapping, pages
from finetune_operator.replicate_api.auth import Identity, KubernetesAuth, ReviewFailed, bearer_token
from finetune_operator.replicate_api.finetunejobs import AlreadyExists, FineTuneJobs, KubernetesUnavailable
from finetune_operator.replicate_api.mapping import InvalidTraining
from finetune_operator.replicate_api.training import MODEL_NAME_PATTERN, TrainingPage
from finetune_operator.settings import Settings

log = logging.getLogger(__name__)
_MODEL = re.compile(f"^{MODEL_NAME_PATTERN}$")
_VERSION = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_SUFFIX_ALPHABET = string.ascii_lowercase + string.digits
NAME_ATTEMPTS = 3
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ApiError(Exception):
    status: int
    detail: str


def error_response(status: int, detail: str, **more: Any) -> web.Response:
    body = {"title": HTTPStatus(status).phrase, "detail": detail, "status": status, **more}
    headers = {"WWW-Authenticate": 'Bearer realm="finetune-operator"'} if status == 401 else None
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def replicate_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(error.status, error.detail)
    except InvalidTraining as error:
        fields = [{"field": p.field, "description": p.description} for p in error.problems]
        return error_response(422, str(error), invalid_fields=fields)
    except (ReviewFailed, KubernetesUnavailable) as error:
        log.warning("%s %s: %s", request.method, request.path, error)
        return error_response(503, str(error))
    except web.HTTPException as error:  # no such route or method
        return error_response(error.status, error.reason)


class TrainingsApi:
    def __init__(
        self, jobs: FineTuneJobs, auth: KubernetesAuth, settings: Settings, namespaces: Sequence[str] = ()
    ) -> None:
        self._jobs = jobs
        self._auth = auth
        self._settings = settings
        self._namespaces = frozenset(namespaces)

    def application(self) -> web.Application:
        app = web.Application(middlewares=[replicate_errors])
        app.add_routes(
            [
                web.post("/v1/models/{owner}/{name}/versions/{version}/trainings", self.create),
                web.get("/v1/trainings", self.list),
                web.get("/v1/trainings/{id}", self.get),
                web.post("/v1/trainings/{id}/cancel", self.cancel),
            ]
        )
        return app

    async def create(self, request: web.Request) -> web.Response:
        identity = await self._identity(request)
        owner, model, version = (request.match_info[key] for key in ("owner", "name", "version"))
        if not (_MODEL.match(owner) and _MODEL.match(model)):
            raise InvalidTraining.of("model", f"{owner}/{model} is not a model name (owner/name)")
        if not _VERSION.match(version):
            raise InvalidTraining.of("version", f"{version!r} is not a version id")
        try:
            raw = await request.json()
        except ValueError:
            raise ApiError(400, "the body is not JSON") from None
        body = mapping.parse_request(raw)
        destination_owner = body.destination.partition("/")[0]
        namespace = mapping.owner_namespace(destination_owner, self._settings)
        if self._namespaces and namespace not in self._namespaces:
            raise InvalidTraining.of("destination", f"this server does not serve namespace {namespace}")
        await self._authorize(identity, "create", namespace)
        for _ in range(NAME_ATTEMPTS):
            name = mapping.job_name(body.destination.partition("/")[2], _suffix())
            manifest = mapping.finetunejob_manifest(
                body,
                base_model=f"{owner}/{model}",
                version=version,
                namespace=namespace,
                name=name,
                created_by=identity.username,
                settings=self._settings,
            )
            try:
                created = await asyncio.to_thread(self._jobs.create, manifest)
            except AlreadyExists:
                continue
            log.info("%s created training %s", identity.username, mapping.training_id(namespace, name))
            return self._training_response(request, created, status=201)
        raise ApiError(409, "no free name for the FineTuneJob; try again")

    async def get(self, request: web.Request) -> web.Response:
        identity = await self._identity(request)
        namespace, name = self._job_of(request.match_info["id"])
        await self._authorize(identity, "get", namespace)
        found = await asyncio.to_thread(self._jobs.get, namespace, name)
        if found is None:
            raise ApiError(404, "Not found.")
        return self._training_response(request, found)

    async def list(self, request: web.Request) -> web.Response:
        identity = await self._identity(request)
        jobs = await asyncio.to_thread(self._jobs.list)
        namespaces = sorted({job["metadata"]["namespace"] for job in jobs})
        verdicts = await asyncio.gather(
            *(asyncio.to_thread(self._auth.allowed, identity, "list", namespace) for namespace in namespaces)
        )
        readable = {namespace for namespace, allowed in zip(namespaces, verdicts, strict=True) if allowed}
        base = self._base_url(request)
        trainings = [mapping.to_training(job, base) for job in jobs if job["metadata"]["namespace"] in readable]
        shown, cursor = pages.page(trainings, request.query.get("cursor"))
        listing = TrainingPage(results=shown, next=None if cursor is None else f"{base}/v1/trainings?cursor={cursor}")
        return web.json_response(listing.model_dump(mode="json"))

    async def cancel(self, request: web.Request) -> web.Response:
        identity = await self._identity(request)
        namespace, name = self._job_of(request.match_info["id"])
        await self._authorize(identity, "patch", namespace)
        found = await asyncio.to_thread(self._jobs.get, namespace, name)
        if found is not None and not mapping.to_training(found, "").completed_at:
            found = await asyncio.to_thread(self._jobs.cancel, namespace, name)
        if found is None:
            raise ApiError(404, "Not found.")
        return self._training_response(request, found)

    async def _identity(self, request: web.Request) -> Identity:
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            raise ApiError(401, "Authentication credentials were not provided.")
        identity = await asyncio.to_thread(self._auth.authenticate, token)
        if identity is None:
            raise ApiError(401, "Invalid token.")
        return identity

    async def _authorize(self, identity: Identity, verb: str, namespace: str) -> None:
        if not await asyncio.to_thread(self._auth.allowed, identity, verb, namespace):
            raise ApiError(403, f"{identity.username} may not {verb} FineTuneJobs in namespace {namespace}.")

    def _job_of(self, identifier: str) -> tuple[str, str]:
        parsed = mapping.parse_training_id(identifier)
        if parsed is None or (self._namespaces and parsed[0] not in self._namespaces):
            raise ApiError(404, "Not found.")
        return parsed

    def _base_url(self, request: web.Request) -> str:
        return (self._settings.api_public_url or f"{request.scheme}://{request.host}").rstrip("/")

    def _training_response(self, request: web.Request, job: dict[str, Any], status: int = 200) -> web.Response:
        training = mapping.to_training(job, self._base_url(request))
        return web.json_response(training.model_dump(mode="json"), status=status)


def _suffix() -> str:
    return "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(mapping.NAME_SUFFIX_LENGTH))


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 hosts in brackets) as (host, port)."""
    host, colon, port = listen.rpartition(":")
    if not colon or not port.isdigit() or not host:
        raise ValueError(f"--listen takes HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


async def start_server(api: TrainingsApi, listen: str) -> web.AppRunner:
    """Serve `api` on `listen` in the running event loop; `await runner.cleanup()` stops it."""
    host, port = parse_listen(listen)
    runner = web.AppRunner(api.application())
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("Replicate trainings API listening on %s", listen)
    return runner


def trainings_api(client: Any, settings: Settings, namespaces: Sequence[str] = ()) -> TrainingsApi:
    return TrainingsApi(FineTuneJobs(client, namespaces), KubernetesAuth(client), settings, namespaces)


async def serve(api: TrainingsApi, listen: str) -> None:
    """`finetune-operator api`: serve until SIGTERM or SIGINT."""
    runner = await start_server(api, listen)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    try:
        await stopped.wait()
    finally:
        await runner.cleanup()
