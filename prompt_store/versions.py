"""One immutable task version on disk: staged and committed durably, read back and re-validated on every load."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prompt_store.adapter import CONFIG_NAME, MODEL_NAME, AdapterContent, StoreLimits, check_sizes, parse_adapter
from prompt_store.errors import InvalidTask, StoreError, TaskNotFound
from prompt_store.fsio import fsync_dir, rename_dir_if_absent, write_dir_durably
from prompt_store.layout import LABELS_NAME, RECORD_NAME, StoreLayout
from prompt_store.types import BackboneFingerprint, TaskArtifact, TaskRecord

RECORD_FORMAT = 1
_MAX_COMMIT_ATTEMPTS = 1000


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class ParsedAdapter:
    """A validated upload, before it has a version number."""

    config_bytes: bytes
    model_bytes: bytes
    content: AdapterContent
    sha256: str

    @property
    def config(self) -> dict[str, Any]:
        return self.content.config

    @property
    def num_virtual_tokens(self) -> int:
        return self.content.num_virtual_tokens

    @property
    def nbytes(self) -> int:
        return len(self.config_bytes) + len(self.model_bytes)

    @property
    def labels_bytes(self) -> bytes | None:
        """The label names as stored next to the adapter (classification tasks only)."""
        labels = self.content.labels
        return json.dumps(list(labels)).encode() if labels is not None else None

    def record(self, task_id: str, version: int, created_at: str) -> TaskRecord:
        content = self.content
        return TaskRecord(
            task_id, version, content.method, self.num_virtual_tokens, self.nbytes, self.sha256, created_at,
            content.task_type, content.labels, content.rank,
        )  # fmt: skip

    def artifact(self, record: TaskRecord) -> TaskArtifact:
        return TaskArtifact(record=record, config=self.config, prompt_embeddings=self.content.prompt,
                            head=self.content.head, modules=self.content.modules)  # fmt: skip


def parse_upload(
    config_bytes: bytes,
    model_bytes: bytes,
    fingerprint: BackboneFingerprint,
    limits: StoreLimits,
    labels: bytes | None = None,
) -> ParsedAdapter:
    content = parse_adapter(config_bytes, model_bytes, fingerprint, limits, labels)
    return ParsedAdapter(config_bytes, model_bytes, content, sha256_hex(model_bytes))


def record_json(task_id: str, parsed: ParsedAdapter, created_at: str) -> bytes:
    return json.dumps(record_fields(task_id, parsed, created_at), indent=2).encode()


def record_fields(task_id: str, parsed: ParsedAdapter, created_at: str) -> dict[str, Any]:
    # No version inside: the version is the directory (or manifest) name, chosen only at commit time.
    return {
        "format": RECORD_FORMAT,
        "task_id": task_id,
        "method": parsed.content.method.value,
        "task_type": parsed.content.task_type,
        "num_virtual_tokens": parsed.num_virtual_tokens,
        "bytes": parsed.nbytes,
        "sha256": parsed.sha256,
        "created_at": created_at,
    }


def stage_version(layout: StoreLayout, task_id: str, parsed: ParsedAdapter, created_at: str) -> Path:
    files = {
        CONFIG_NAME: parsed.config_bytes,
        MODEL_NAME: parsed.model_bytes,
        RECORD_NAME: record_json(task_id, parsed, created_at),
    }
    if parsed.labels_bytes is not None:
        files[LABELS_NAME] = parsed.labels_bytes
    return write_dir_durably(layout.tmp_dir, files)


def ensure_task_dir(layout: StoreLayout, task_id: str) -> None:
    task_dir = layout.task_dir(task_id)
    if task_dir.is_dir():
        return
    task_dir.mkdir(exist_ok=True)
    fsync_dir(layout.tasks_dir)


def commit_version(layout: StoreLayout, task_id: str, staging: Path) -> tuple[int, bool]:
    """Rename a staged version to the next free number; return (version, created: no earlier version existed).

    Callers hold the store lock, but a writer that does not (or a filesystem where flock is advisory only)
    still cannot clobber a version: the rename fails on an existing directory and we take the next number.
    """
    for _ in range(_MAX_COMMIT_ATTEMPTS):
        existing = layout.versions(task_id)
        version = max([*existing, layout.tombstone(task_id)]) + 1
        ensure_task_dir(layout, task_id)
        try:
            committed = rename_dir_if_absent(staging, layout.version_dir(task_id, version))
        except FileNotFoundError:  # the task directory was deleted under us: recreate it
            continue
        if committed:
            fsync_dir(layout.task_dir(task_id))
            return version, not existing
    raise StoreError(f"could not commit a version of task {task_id!r} after {_MAX_COMMIT_ATTEMPTS} attempts")


def read_labels(directory: Path, limits: StoreLimits) -> bytes | None:
    """A version's label names (`labels.json`, a JSON array), if it has them."""
    path = directory / LABELS_NAME
    if not path.is_file():
        return None
    if path.stat().st_size > limits.max_config_bytes:
        raise InvalidTask(f"{path}: expected at most {limits.max_config_bytes} bytes; found {path.stat().st_size}")
    return path.read_bytes()


def read_adapter_files(directory: Path, limits: StoreLimits) -> tuple[bytes, bytes]:
    """Read a PEFT adapter directory; sizes are checked before anything is read."""
    config_path, model_path = directory / CONFIG_NAME, directory / MODEL_NAME
    if not model_path.is_file():
        found = sorted(path.name for path in directory.iterdir()) if directory.is_dir() else "no directory"
        raise InvalidTask(
            f"{directory}: expected {CONFIG_NAME} and {MODEL_NAME} (only safetensors is read); found {found}"
        )
    if not config_path.is_file():
        raise InvalidTask(f"{directory}: expected {CONFIG_NAME}; it is missing")
    check_sizes(config_path.stat().st_size, model_path.stat().st_size, limits)
    return config_path.read_bytes(), model_path.read_bytes()


def read_record_fields(version_dir: Path) -> dict[str, Any]:
    try:
        fields = json.loads((version_dir / RECORD_NAME).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidTask(
            f"{version_dir / RECORD_NAME}: expected a JSON object; found malformed JSON ({exc})"
        ) from None
    if not isinstance(fields, dict) or not isinstance(fields.get("created_at"), str):
        raise InvalidTask(
            f"{version_dir / RECORD_NAME}: expected an object with sha256 and created_at; found {fields!r}"
        )
    return fields


def read_version(
    layout: StoreLayout, task_id: str, version: int, fingerprint: BackboneFingerprint, limits: StoreLimits
) -> TaskArtifact:
    """Load and re-validate a committed version; TaskNotFound if it is gone, InvalidTask if it is damaged."""
    version_dir = layout.version_dir(task_id, version)
    try:
        fields = read_record_fields(version_dir)
        config_bytes, model_bytes = read_adapter_files(version_dir, limits)
        labels = read_labels(version_dir, limits)
    except FileNotFoundError:
        if not version_dir.is_dir():  # removed by a replacement or a delete, maybe in another process
            raise TaskNotFound(task_id, version) from None
        raise InvalidTask(f"{version_dir}: expected {CONFIG_NAME}, {MODEL_NAME} and {RECORD_NAME}") from None
    except InvalidTask:
        if not version_dir.is_dir():
            raise TaskNotFound(task_id, version) from None
        raise
    stored = StoredVersion(task_id, version, fields, config_bytes, model_bytes, labels)
    return stored.validate(fingerprint, limits, str(version_dir))


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """A committed version's bytes as read back, before re-validation."""

    task_id: str
    version: int
    fields: dict[str, Any]  # the record written at registration (sha256, created_at, ...)
    config_bytes: bytes
    model_bytes: bytes
    labels: bytes | None

    def validate(self, fingerprint: BackboneFingerprint, limits: StoreLimits, where: str) -> TaskArtifact:
        """Re-validate as an upload, and check it is what was registered (sha256 and task id)."""
        fields, task_id = self.fields, self.task_id
        parsed = parse_upload(self.config_bytes, self.model_bytes, fingerprint, limits, self.labels)
        if parsed.sha256 != fields.get("sha256") or fields.get("task_id", task_id) != task_id:
            raise InvalidTask(
                f"{where}: expected sha256 {fields.get('sha256')!r} of task {fields.get('task_id')!r}; "
                f"found {parsed.sha256!r} in the version of task {task_id!r}"
            )
        return parsed.artifact(parsed.record(task_id, self.version, fields["created_at"]))


def labels_of_dir(directory: Path) -> bytes | None:
    """Label names next to an adapter: a `labels.json` array (as the store keeps them), else the `id2label` of a
    `config.json` (what transformers' `config.save_pretrained` writes); None if there is neither."""
    if (directory / LABELS_NAME).is_file():
        return (directory / LABELS_NAME).read_bytes()
    config_path = directory / "config.json"
    if not config_path.is_file():
        return None
    try:
        id2label = json.loads(config_path.read_bytes()).get("id2label")
    except (ValueError, AttributeError) as exc:
        raise InvalidTask(f"{config_path}: expected a JSON object; found {exc}") from None
    if id2label is None:
        return None
    expected = [str(i) for i in range(len(id2label))] if isinstance(id2label, dict) else None
    if expected is None or sorted(id2label, key=lambda k: (len(k), k)) != expected:
        raise InvalidTask(f"{config_path}: id2label must map the ids 0..N-1 to names; found {str(id2label)[:200]}")
    return json.dumps([id2label[key] for key in expected]).encode()
