"""Reading a task upload: a multipart body with the file parts `adapter_config` and `adapter_model`, and optionally
`labels` (a classification task's label names, a JSON array; a file part or a text field)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from server.api.errors import ApiError, BodyTooLarge
from server.api.settings import Settings

CONFIG_PART, MODEL_PART, LABELS_PART = "adapter_config", "adapter_model", "labels"
PARTS = (CONFIG_PART, MODEL_PART, LABELS_PART)
MAX_TEXT_FIELDS = 8  # only so that a text field where a file belongs gets a precise message

UPLOAD_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [CONFIG_PART, MODEL_PART],
                    "additionalProperties": False,
                    "properties": {
                        CONFIG_PART: {"type": "string", "format": "binary", "description": "adapter_config.json"},
                        MODEL_PART: {"type": "string", "format": "binary", "description": "adapter_model.safetensors"},
                        LABELS_PART: {
                            "type": "string",
                            "description": "SEQ_CLS and TOKEN_CLS tasks: a JSON array of label names, class i at "
                            'index i (e.g. ["negative", "positive"]); default LABEL_0, LABEL_1, ...',
                        },
                    },
                },
                "encoding": {  # what each part holds; the server reads the JSON parts as JSON
                    CONFIG_PART: {"contentType": "application/json"},
                    MODEL_PART: {"contentType": "application/octet-stream"},
                    LABELS_PART: {"contentType": "application/json"},
                },
            }
        },
    }
}


@dataclass(frozen=True, slots=True)
class AdapterUpload:
    config: bytes
    model: bytes
    labels: bytes | None = None


def invalid(message: str) -> ApiError:
    return ApiError(422, "validation", message)


async def read_adapter_upload(request: Request, settings: Settings) -> AdapterUpload:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise invalid(
            f"expected a multipart/form-data body with file parts '{CONFIG_PART}' and '{MODEL_PART}'; "
            f"found Content-Type {content_type or 'none'!r}"
        )
    form = await parse_form(request)
    try:
        check_parts(form)
        config = await read_part(form, CONFIG_PART, settings.engine.max_config_bytes)
        model = await read_part(form, MODEL_PART, settings.engine.max_adapter_bytes)
        labels = await read_labels(form, settings.engine.max_config_bytes)
    finally:
        await form.close()
    return AdapterUpload(config=config, model=model, labels=labels)


async def parse_form(request: Request) -> FormData:
    try:
        return await request.form(max_files=len(PARTS), max_fields=MAX_TEXT_FIELDS)
    except BodyTooLarge:
        raise
    except HTTPException as exc:  # Starlette's multipart parser: "Missing boundary in multipart." and the like
        raise ApiError(
            400,
            "validation",
            f"expected a multipart/form-data body with the file parts '{CONFIG_PART}' and '{MODEL_PART}' (and "
            f"optionally '{LABELS_PART}'); found a body the multipart parser refused ({exc.detail})",
        ) from None


def check_parts(form: FormData) -> None:
    """The two file parts and maybe labels (a fourth file is refused by the parser): anything else is a mistake
    worth naming."""
    found = sorted(form.keys())
    repeated = sorted({name for name, count in Counter(name for name, _ in form.multi_items()).items() if count > 1})
    if repeated:
        raise invalid(f"expected each multipart part once; found {repeated} more than once")
    missing = [name for name in (CONFIG_PART, MODEL_PART) if name not in form]
    if missing:
        raise invalid(f"expected the multipart file parts {missing} (missing); found parts {found}")
    extra = [name for name in found if name not in PARTS]
    if extra:
        raise invalid(f"expected only the multipart parts {list(PARTS)} (labels optional); found also {extra}")


async def read_part(form: FormData, name: str, limit: int) -> bytes:
    part = form[name]
    if not isinstance(part, UploadFile):
        raise invalid(f"{name}: expected a file part (a filename in its Content-Disposition); found a text field")
    if part.size is not None and part.size > limit:
        raise ApiError(413, "too_large", f"{name}: expected at most {limit} bytes; found {part.size}")
    return await part.read()


async def read_labels(form: FormData, limit: int) -> bytes | None:
    """The optional label names, as a file part or a text field."""
    part = form.get(LABELS_PART)
    if part is None:
        return None
    data = await part.read() if isinstance(part, UploadFile) else part.encode()
    if len(data) > limit:
        raise ApiError(413, "too_large", f"{LABELS_PART}: expected at most {limit} bytes; found {len(data)}")
    return data
