"""`finetune-operator run`: the operator's entry point; `finetune-operator api`: Replicate's trainings API alone."""

from __future__ import annotations

import argparse
import asyncio
import logging

import kopf
from prometheus_client import start_http_server

from finetune_operator.kube import load_client
from finetune_operator.replicate_api.server import serve, trainings_api
from finetune_operator.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="finetune-operator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the operator")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch only this namespace (repeat)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)")
    run.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", help="kopf liveness endpoint URL")
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
    import finetune_operator.handlers  # noqa: F401  (registers the handlers with kopf)

    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
        memo=kopf.Memo(api_listen=args.api_listen, namespaces=tuple(args.namespace)),
    )


if __name__ == "__main__":
    main()
