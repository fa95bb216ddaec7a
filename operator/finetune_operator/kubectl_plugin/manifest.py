"""The FineTuneJob that `kubectl ftj create` makes: a base manifest, `--set` values and the data URIs."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from finetune_operator.api import API_VERSION, KIND, FineTuneJobSpec


class InvalidManifest(ValueError):
    """A manifest the API server would refuse; the message names the field."""


def parse_set(assignment: str) -> tuple[list[str], Any]:
    """`input.learning_rate=2e-4` -> (["input", "learning_rate"], 0.0002).

    The path is under `spec`. The value is read as JSON when it is JSON (numbers, true/false, null, lists,
    quoted strings), else taken as a plain string, so `--set input.validation_prompt=What is LoRA?` needs no quotes.
    """
    path, separator, text = assignment.partition("=")
    keys = path.strip().split(".")
    if not separator or not all(keys):
        raise InvalidManifest(f"--set {assignment!r}: expected FIELD=VALUE, e.g. input.num_train_epochs=2")
    try:
        value: Any = json.loads(text)
    except ValueError:
        value = text
    return keys, value


def build_manifest(
    name: str,
    namespace: str,
    base: Mapping[str, Any] | None,
    assignments: Sequence[str],
    data: Mapping[str, str],
) -> dict[str, Any]:
    """The FineTuneJob: `base` (a FineTuneJob manifest, or None), then `assignments`, then `data` (input field ->
    URI). Raises InvalidManifest naming the field when the spec would not pass the CRD's schema."""
    manifest: dict[str, Any] = copy.deepcopy(dict(base)) if base else {}
    if manifest.get("kind", KIND) != KIND:
        raise InvalidManifest(f"the base manifest is a {manifest['kind']}, not a {KIND}")
    metadata = dict(manifest.get("metadata") or {})
    for generated in ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields"):
        metadata.pop(generated, None)
    metadata.update(name=name, namespace=namespace)
    spec: dict[str, Any] = dict(manifest.get("spec") or {})
    for assignment in assignments:
        keys, value = parse_set(assignment)
        _assign(spec, keys, value, assignment)
    inputs = spec.get("input") or {}
    if not isinstance(inputs, dict):
        raise InvalidManifest("spec.input: must be an object (Replicate's training inputs)")
    spec["input"] = {**inputs, **data}
    try:
        FineTuneJobSpec.model_validate(spec)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in ("spec", *first["loc"]))
        raise InvalidManifest(f"{where}: {first['msg']}") from None
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


def _assign(spec: dict[str, Any], keys: list[str], value: Any, assignment: str) -> None:
    node = spec
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            where = ".".join(["spec", *keys[: depth + 1]])
            raise InvalidManifest(f"--set {assignment!r}: {where} is not an object")
        node = child
    node[keys[-1]] = value
