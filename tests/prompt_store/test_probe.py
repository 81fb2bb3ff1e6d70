"""The start-up probe: a store opens, lists and takes a write (and keeps nothing of it); a location that reads
as a URI but is not s3:// is refused, never made a directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from prompt_store.backend import StoreTimeouts, check_location, probe_store
from prompt_store.errors import StoreError
from tests.prompt_store.seaweed import SeaweedS3


def test_probe_passes_and_leaves_nothing_in_a_directory(tmp_path: Path) -> None:
    probe_store(str(tmp_path / "store"), StoreTimeouts())
    assert [path for path in (tmp_path / "store").rglob("*") if path.is_file()] == []


def test_probe_refuses_a_directory_it_cannot_write(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreError, match=r"expected a directory this process can list and write; found "):
        probe_store(str(tmp_path / "file" / "store"), StoreTimeouts())


def test_probe_passes_and_leaves_nothing_on_s3(s3_server: SeaweedS3) -> None:
    uri = s3_server.new_uri()
    probe_store(uri, StoreTimeouts(max_attempts=1))
    prefix = uri.removeprefix("s3://").partition("/")[2]
    listed = s3_server.client().list_objects_v2(Bucket="promptserve-test", Prefix=prefix + "/")
    assert listed.get("Contents", []) == []


def test_probe_refuses_a_missing_bucket(s3_server: SeaweedS3) -> None:
    with pytest.raises(StoreError, match=r"bucket 'no-such-bucket' does not exist"):
        probe_store("s3://no-such-bucket/tasks", StoreTimeouts(max_attempts=1))


@pytest.mark.parametrize("location", ["gs://bucket/x", "S3://bucket/x", "s3:/bucket/x", "s3:bucket", "file:///x"])
def test_a_location_that_reads_as_another_uri_is_refused(location: str) -> None:
    with pytest.raises(StoreError, match=r"^expected "):
        check_location(location)


@pytest.mark.parametrize("location", ["./store", "/data/store", "store", "s3://bucket", "s3://my.bucket-1/a/b"])
def test_directories_and_s3_uris_pass(location: str) -> None:
    check_location(location)
