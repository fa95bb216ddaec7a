"""`finetune-operator run`: the operator's entry point; `finetune-operator api`: Replicate's trainings API alone."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import threading

import kopf
from kubernetes.client import CoordinationV1Api
from prometheus_client import start_http_server

from finetune_operator import metrics
from finetune_operator.kube import load_client
from finetune_operator.leader import LeaderElector, LeaseConfig
from finetune_operator.replicate_api.server import serve, trainings_api
from finetune_operator.settings import Settings

log = logging.getLogger("finetune_operator")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="finetune-operator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the operator")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch only this namespace (repeat)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)")
    run.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", help="where /healthz and /readyz are served")
    run.add_argument("--api-listen", metavar="HOST:PORT", help="also serve Replicate's trainings API here")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    api = commands.add_parser("api", help="serve Replicate's trainings API over FineTuneJobs (no operator)")
    api.add_argument("--listen", metavar="HOST:PORT", required=True, help="address to serve on, e.g. 0.0.0.0:8000")
    api.add_argument("-n", "--namespace", action="append", default=[], help="serve only this namespace (repeat)")
    api.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kopf reports every handled watch event at INFO; ours only enqueue work, so that is noise.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    settings = Settings()
    if args.command == "api":
        asyncio.run(serve(trainings_api(load_client(), settings, args.namespace), args.listen))
        return
    start_http_server(settings.metrics_port)
    from finetune_operator import handlers  # registers the handlers with kopf

    handlers.HEALTH.serve(args.liveness)
    elector = _lead(settings) if settings.leader_election else None
    handlers.HEALTH.leading = True
    try:
        kopf.run(
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            memo=kopf.Memo(api_listen=args.api_listen, namespaces=tuple(args.namespace)),
        )
    finally:
        if elector is not None:
            elector.release()


def _lead(settings: Settings) -> LeaderElector:
    """Stand by until this replica holds the Lease; keep renewing it; exit at once if it is lost."""
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    elector = LeaderElector(
        CoordinationV1Api(load_client(pool_size=2)),
        LeaseConfig(
            namespace=settings.leader_election_namespace,
            name=settings.leader_election_id,
            identity=identity,
            lease_duration=settings.lease_duration_seconds,
            renew_deadline=settings.renew_deadline_seconds,
            retry_period=settings.retry_period_seconds,
        ),
        timeout=settings.retry_period_seconds * 2,
    )
    log.info(
        "%s is standing by for Lease %s/%s", identity, settings.leader_election_namespace, settings.leader_election_id
    )
    elector.wait_until_leading()
    metrics.LEADER.set(1)

    def lost() -> None:
        # Another replica may lead already: this one must not write another byte. Kubernetes restarts it.
        metrics.LEADER.set(0)
        os._exit(1)

    elector.keep_leading(on_lost=lost, stop=threading.Event())
    return elector


if __name__ == "__main__":
    main()
