"""`kubectl ftj`: the kubectl plugin for people who run fine-tunes (create, watch, logs, list, download, ...).

It talks to the API server as its user, with kubectl's kubeconfig; it never imports the operator's runtime (kopf).
Its libraries are the `kubectl` extra: `pip install 'finetune-operator[kubectl]'` puts `kubectl-ftj` on PATH.
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from finetune_operator.kubectl_plugin.cli import main as run
    except ModuleNotFoundError as missing:
        sys.stderr.write(
            f"kubectl ftj needs the package's kubectl extra ({missing.name} is not installed): "
            "pip install 'finetune-operator[kubectl]'\n"
        )
        return 1
    return run()
