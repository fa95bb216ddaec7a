"""Storage: each URI becomes one fsspec filesystem and a path in one place; the operations work the same on any."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_contract import uris
from finetune_trainer import storage

pytestmark = pytest.mark.trainer


@pytest.fixture
def memory_root() -> Iterator[str]:
    """fsspec's in-memory filesystem: a remote store (not local) with no server."""
    import fsspec

    fs = fsspec.filesystem("memory")
    yield "memory://bucket"
    fs.rm("/bucket", recursive=True)


def test_pvc_uris_are_paths_under_the_mounted_claim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uris, "PVC_MOUNT_ROOT", str(tmp_path / "mnt"))
    where = storage.locate("pvc://datasets/llama/train.jsonl")
    assert where.is_local
    assert where.path == f"{tmp_path}/mnt/datasets/llama/train.jsonl"
    storage.write_bytes("pvc://datasets/llama/train.jsonl", b"{}\n")
    assert (tmp_path / "mnt" / "datasets" / "llama" / "train.jsonl").read_bytes() == b"{}\n"


def test_each_remote_scheme_is_its_fsspec_filesystem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    s3 = storage.locate("s3://finetunes/jobs/a/adapter_model.safetensors")
    assert (type(s3.fs).__name__, s3.path) == ("S3FileSystem", "finetunes/jobs/a/adapter_model.safetensors")
    assert s3.fs.client_kwargs.get("endpoint_url") == "http://127.0.0.1:9000" or s3.fs.endpoint_url == (
        "http://127.0.0.1:9000"
    )
    hf = storage.locate("hf://meta-llama/Llama-2-7b-hf")
    assert (type(hf.fs).__name__, hf.path) == ("HfFileSystem", "meta-llama/Llama-2-7b-hf")
    https = storage.locate("https://data.example.com/train.jsonl")
    assert type(https.fs).__name__ == "HTTPFileSystem"
    assert not any(where.is_local for where in (s3, hf, https))
    local = storage.locate("relative/dir")
    assert local.is_local
    assert local.path == str(Path("relative/dir").resolve())


def test_files_round_trip_through_a_remote_filesystem(memory_root: str, tmp_path: Path) -> None:
    source = tmp_path / "adapter"
    (source / "nested").mkdir(parents=True)
    (source / "adapter_config.json").write_text("{}")
    (source / "nested" / "tokenizer.json").write_text('{"v": 1}')
    destination = storage.join(memory_root, "jobs", "run-1")
    storage.upload_dir(source, destination)
    assert storage.list_names(destination) == ["adapter_config.json", "nested"]
    assert storage.read_bytes(storage.join(destination, "nested/tokenizer.json")) == b'{"v": 1}'
    with storage.open_binary(storage.join(destination, "adapter_config.json")) as handle:
        assert handle.read() == b"{}"

    copy = storage.download_once(destination, tmp_path / "copy")
    assert (copy / "nested" / "tokenizer.json").read_text() == '{"v": 1}'
    assert not (tmp_path / "copy.partial").exists()
    only = storage.download_files(destination, ("adapter_config.json", "tokenizer.model"))
    assert sorted(path.name for path in only.iterdir()) == ["adapter_config.json"]

    marker = storage.join(destination, "COMPLETE")
    storage.write_bytes(marker, b"done")
    assert storage.exists(marker)
    storage.delete(marker)
    assert not storage.exists(marker)
    assert storage.list_names(storage.join(memory_root, "nothing-here")) == []
    with pytest.raises(FileNotFoundError):
        storage.download_dir(storage.join(memory_root, "nothing-here"), tmp_path / "none")


def test_a_local_directory_is_used_where_it_is(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    assert storage.download_once(str(tmp_path / "weights"), tmp_path / "copy") == tmp_path / "weights"
    assert not (tmp_path / "copy").exists()
    with pytest.raises(FileNotFoundError):
        storage.download_dir(str(tmp_path / "missing"), tmp_path / "copy")
