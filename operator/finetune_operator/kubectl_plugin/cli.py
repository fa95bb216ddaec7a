"""The commands of `kubectl ftj`: thin glue between typer, the cluster and the object store."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from kubernetes.client.exceptions import ApiException
from kubernetes.config import ConfigException
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from finetune_operator.kubectl_plugin import objectstore
from finetune_operator.kubectl_plugin.create import (
    DEFAULT_OPERATOR_NAMESPACE,
    CreateError,
    CreateRequest,
    LocalData,
    api_error,
    plan,
    prepare,
    upload_and_create,
)
from finetune_operator.kubectl_plugin.download import DownloadError, download_outputs
from finetune_operator.kubectl_plugin.kubeapi import Cluster, NotFound
from finetune_operator.kubectl_plugin.view import list_table, read_status
from finetune_operator.kubectl_plugin.watch import watch as watch_job

app = typer.Typer(
    name="kubectl ftj",
    help="Create, follow and collect FineTuneJobs (finetune.dev/v1alpha1).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

Kubeconfig = Annotated[str | None, typer.Option("--kubeconfig", help="Path to the kubeconfig file.")]
Context = Annotated[str | None, typer.Option("--context", help="The kubeconfig context to use.")]
Namespace = Annotated[
    str | None, typer.Option("--namespace", "-n", help="The namespace (default: the context's namespace).")
]
Name = Annotated[str, typer.Argument(help="The FineTuneJob's name.")]


class DryRun(StrEnum):
    NONE = "none"
    CLIENT = "client"
    SERVER = "server"


class Output(StrEnum):
    NAME = "name"
    YAML = "yaml"
    JSON = "json"


def _cluster(kubeconfig: str | None, context: str | None, namespace: str | None) -> Cluster:
    return Cluster(kubeconfig, context, namespace)


def _print_object(obj: dict[str, Any], output: Output, action: str) -> None:
    # Written as it is, never wrapped: scripts and GitOps repositories read it.
    if output is Output.YAML:
        sys.stdout.write(yaml.safe_dump(obj, sort_keys=False, width=1 << 16))
    elif output is Output.JSON:
        sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    else:
        sys.stdout.write(f"finetunejob.finetune.dev/{obj['metadata']['name']} {action}\n")


def _transfer_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
    )


@app.command("create")
def create_command(
    *,
    name: Name,
    train_data: Annotated[str, typer.Option("--train-data", help="A local JSONL file (uploaded) or a data URI.")],
    validation_data: Annotated[
        str | None, typer.Option("--validation-data", help="A local JSONL file (uploaded) or a data URI.")
    ] = None,
    assignments: Annotated[
        list[str] | None,
        typer.Option("--set", help="A spec field, e.g. input.num_train_epochs=2 or resources.nodes=2 (repeatable)."),
    ] = None,
    base: Annotated[
        Path | None, typer.Option("--filename", "-f", help="A FineTuneJob manifest to start from.", exists=True)
    ] = None,
    data_location: Annotated[
        str | None,
        typer.Option(
            "--data-location",
            envvar="FTJ_DATA_LOCATION",
            help="Where local data goes (s3:// or gs://), under <namespace>/<name>/. "
            "Default: the operator's, from its Helm chart.",
        ),
    ] = None,
    operator_namespace: Annotated[
        str,
        typer.Option(
            "--operator-namespace",
            envvar="FTJ_OPERATOR_NAMESPACE",
            help="Where the operator's Helm chart publishes its client settings.",
        ),
    ] = DEFAULT_OPERATOR_NAMESPACE,
    dry_run: Annotated[
        DryRun,
        typer.Option("--dry-run", help="client: print the manifest, upload nothing; server: ask the API server."),
    ] = DryRun.NONE,
    output: Annotated[Output, typer.Option("--output", "-o", help="How to print the FineTuneJob.")] = Output.NAME,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """Check local data with the trainer's rules, upload it to the operator's data location, create the job."""
    base_manifest = yaml.safe_load(base.read_text()) if base is not None else None
    if namespace is None and base_manifest and base_manifest.get("metadata", {}).get("namespace"):
        namespace = base_manifest["metadata"]["namespace"]
    cluster = _cluster(kubeconfig, context, namespace)
    data = {"train_data": train_data}
    if validation_data is not None:
        data["validation_data"] = validation_data
    request = CreateRequest(
        name=name,
        data=data,
        base=base_manifest,
        assignments=assignments or [],
        data_location=data_location,
        operator_namespace=operator_namespace,
    )
    if dry_run is not DryRun.NONE:
        manifest, _ = plan(cluster, request)
        if dry_run is DryRun.SERVER:
            try:
                manifest = cluster.create(manifest, dry_run=True)
            except ApiException as error:
                raise CreateError(api_error(error)) from None
        _print_object(manifest, output, f"created ({dry_run.value} dry run)")
        return

    manifest, uploads = prepare(cluster, request)
    with _transfer_progress() as progress:

        def upload(data: LocalData, uri: str) -> None:
            task = progress.add_task(f"{data.field} -> {uri}", total=data.size)
            objectstore.upload(data.path, uri, lambda sent: progress.advance(task, sent))

        created = upload_and_create(cluster, manifest, uploads, upload)
    _print_object(created, output, "created")


@app.command("watch")
def watch_command(
    name: Name, kubeconfig: Kubeconfig = None, context: Context = None, namespace: Namespace = None
) -> None:
    """A live view until the job finishes. Exit code: 0 Succeeded, 1 Failed, 3 Canceled."""
    raise typer.Exit(watch_job(_cluster(kubeconfig, context, namespace), name, out))


@app.command("logs")
def logs_command(
    *,
    name: Name,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Go on printing new lines.")] = False,
    rank: Annotated[int, typer.Option("--rank", min=0, help="The trainer pod's rank (its completion index).")] = 0,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """The trainer log of rank 0 (or --rank N); before training starts, the data validation log."""
    cluster = _cluster(kubeconfig, context, namespace)
    cluster.get(name)
    pod = cluster.trainer_pod(name, rank)
    if pod is None:
        raise NotFound(f"finetunejob {name} has no trainer pod of rank {rank}")
    for line in cluster.log(pod["metadata"]["name"], "trainer", follow):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


@app.command("list")
def list_command(
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A", help="Every namespace.")] = False,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """FineTuneJobs with phase, progress, loss, GPU-hours and age."""
    cluster = _cluster(kubeconfig, context, namespace)
    jobs = cluster.finetunejobs(all_namespaces)
    if not jobs:
        where = "any namespace" if all_namespaces else f"namespace {cluster.namespace}"
        err.print(f"No finetunejobs found in {where}.")
        return
    out.print(list_table(jobs, all_namespaces))


def _set_spec(cluster: Cluster, name: str, change: dict[str, bool], verb: str, done: str) -> None:
    phase = read_status(cluster.get(name).get("status")).phase
    if phase.finished:
        out.print(f"finetunejob.finetune.dev/{name} is already {phase.value}: nothing to {verb}", highlight=False)
        return
    cluster.patch_spec(name, change)
    out.print(f"finetunejob.finetune.dev/{name} {done}", highlight=False)


@app.command("cancel")
def cancel_command(
    name: Name, kubeconfig: Kubeconfig = None, context: Context = None, namespace: Namespace = None
) -> None:
    """Stop the job for good: its pods go, its status stays (spec.cancel)."""
    _set_spec(_cluster(kubeconfig, context, namespace), name, {"cancel": True}, "cancel", "canceled")


@app.command("suspend")
def suspend_command(
    name: Name, kubeconfig: Kubeconfig = None, context: Context = None, namespace: Namespace = None
) -> None:
    """Hold the job: no pod keeps its GPUs until it is resumed (spec.suspend)."""
    _set_spec(_cluster(kubeconfig, context, namespace), name, {"suspend": True}, "suspend", "suspended")


@app.command("resume")
def resume_command(
    name: Name, kubeconfig: Kubeconfig = None, context: Context = None, namespace: Namespace = None
) -> None:
    """Let a suspended job run again."""
    _set_spec(_cluster(kubeconfig, context, namespace), name, {"suspend": False}, "resume", "resumed")


@app.command("download")
def download_command(
    *,
    name: Name,
    directory: Annotated[Path | None, typer.Argument(help="Where the files go (default: ./NAME).")] = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """Fetch the output files and check each one's sha256 against the job's status."""
    finetunejob = _cluster(kubeconfig, context, namespace).get(name)
    target = directory or Path(name)
    with _transfer_progress() as progress:

        def bar(path: str, size: int) -> objectstore.Progress:
            task = progress.add_task(path, total=size)
            return lambda received: progress.advance(task, received)

        files = download_outputs(finetunejob, target, bar)
    for path in files:
        out.print(f"{path}  sha256 ok", markup=False, highlight=False)


def main() -> int:
    try:
        app(prog_name="kubectl ftj")
    except (CreateError, DownloadError, NotFound, ConfigException) as error:
        err.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        return 1
    except ApiException as error:
        err.print(f"error: {api_error(error)}", markup=False, highlight=False, soft_wrap=True)
        return 1
    return 0
