"""The archive that the krew manifest (ftj.yaml) points at: the launcher, built byte for byte
the same on every machine, so that the manifest's sha256 can be checked against a fresh build.

    python plugins/krew/archive.py dist/      # writes dist/kubectl-ftj-v<version>.tar.gz, prints its sha256
"""

from __future__ import annotations

import gzip
import hashlib
import io
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = {"kubectl-ftj": HERE / "kubectl-ftj"}


def archive_bytes() -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in sorted(FILES.items()):
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def version() -> str:
    for line in (HERE / "kubectl-ftj").read_text().splitlines():
        if line.startswith("version="):
            return line.removeprefix("version=")
    raise ValueError("kubectl-ftj sets no version")


def main(argv: list[str]) -> int:
    target = Path(argv[0] if argv else "dist")
    target.mkdir(parents=True, exist_ok=True)
    data = archive_bytes()
    path = target / f"kubectl-ftj-v{version()}.tar.gz"
    path.write_bytes(data)
    print(f"{path} sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
