"""`kubectl ftj watch`: a live view until the job finishes; the exit code says how it finished."""

from __future__ import annotations

from rich.console import Console
from rich.live import Live

from finetune_operator.api.status import Phase
from finetune_operator.kubectl_plugin.kubeapi import Cluster
from finetune_operator.kubectl_plugin.view import read_status, watch_view

# Scripts and CI wait on these: 0 succeeded, 1 failed, 3 canceled (2 is a usage error, as for every command).
EXIT_CODES = {Phase.SUCCEEDED: 0, Phase.FAILED: 1, Phase.CANCELED: 3}


def watch(cluster: Cluster, name: str, console: Console) -> int:
    with Live(console=console, auto_refresh=False, redirect_stdout=False) as live:
        for finetunejob in cluster.watch(name):
            live.update(watch_view(finetunejob, width=console.width), refresh=True)
            phase = read_status(finetunejob.get("status")).phase
            if phase.finished:
                return EXIT_CODES[phase]
    raise RuntimeError(f"the watch of finetunejob {name} ended before the job finished")
