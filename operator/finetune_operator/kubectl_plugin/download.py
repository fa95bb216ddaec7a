"""`kubectl ftj download`: the output files, each checked against the sha256 that status lists for it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from finetune_operator.kubectl_plugin import objectstore
from finetune_operator.kubectl_plugin.view import read_status

# (file name, size) -> the callback that advances its progress bar
ProgressFactory = Callable[[str, int], objectstore.Progress]


class DownloadError(Exception):
    pass


def download_outputs(finetunejob: Mapping[str, Any], target: Path, progress: ProgressFactory) -> list[Path]:
    """Each output file into `target`; a file whose sha256 differs from the status's is not kept."""
    name = finetunejob.get("metadata", {}).get("name", "")
    status = read_status(finetunejob.get("status"))
    output = status.output
    if output is None:
        raise DownloadError(f"finetunejob {name} has no output yet (phase {status.phase.value})")
    if objectstore.scheme(output.weights) not in objectstore.DOWNLOAD_SCHEMES:
        raise DownloadError(f"the weights are at {output.weights}: download reads s3://, gs:// and https://")
    if not output.files:
        raise DownloadError(f"finetunejob {name} lists no output files (status.output.files) to check")
    root = target.resolve()
    kept: list[Path] = []
    mismatches: list[str] = []
    for file in output.files:
        path = (root / file.path).resolve()
        if not path.is_relative_to(root):
            raise DownloadError(f"output file {file.path!r} points outside {target}")
        partial = path.with_name(path.name + ".partial")
        digest = objectstore.download(
            objectstore.join(output.weights, file.path), partial, progress(file.path, file.size)
        )
        if digest != file.sha256:
            partial.unlink()
            mismatches.append(f"{file.path}: sha256 {digest} does not match the status's {file.sha256}")
            continue
        partial.replace(path)
        kept.append(path)
    if mismatches:
        raise DownloadError("; ".join(mismatches) + " (the file was not kept)")
    return kept
