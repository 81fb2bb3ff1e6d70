"""What is checked before the model loads, so a wrong setting fails in seconds rather than after minutes of loading:
the port (bound here and handed to the server), the store (reached, listed and written within its own timeouts)
and the model (a directory that exists with a config and a tokenizer, or a Hugging Face id whose config resolves).
Each failure is a StartupError: one line naming the setting, its value, what was expected and what was found.
"""

from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path

from prompt_store.backend import StoreTimeouts, probe_store
from prompt_store.errors import StoreError, StoreUnavailable
from server.api.settings import Settings, SettingSpec

logger = logging.getLogger(__name__)

# what transformers' tokenizers load from (a fast tokenizer's file, a config naming the class, or a vocabulary)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "sentencepiece.bpe.model", "spm.model")  # fmt: skip
PROBE_ATTEMPTS = 1  # the start-up probe tries once: a hung endpoint fails within its connect and read timeouts


class StartupError(Exception):
    """A setting the server cannot start with, found before the model loads."""

    def __init__(self, name: str, value: object, problem: str) -> None:
        spec = SettingSpec(name, None, "", None)
        super().__init__(f"{name}={value!r} ({spec.flag}, {spec.variable}): {problem}")


def check_before_loading(settings: Settings) -> None:
    """The store, then the model: StartupError on the first that cannot serve."""
    check_store(settings)
    check_model(settings.engine.model)


def bind_port(settings: Settings) -> socket.socket:
    """The listening socket, bound now (the server takes it): a port in use fails before anything loads."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a restart reuses a TIME_WAIT port
    try:
        sock.bind((settings.host, settings.port))
    except OSError as error:
        sock.close()
        name, value = ("port", settings.port) if error.errno == errno.EADDRINUSE else ("host", settings.host)
        raise StartupError(
            name, value, f"expected an address and port free to listen on; found {settings.host}:{settings.port}: "
            f"{error.strerror}"
        ) from error  # fmt: skip
    sock.set_inheritable(True)
    return sock


def check_store(settings: Settings) -> None:
    config = settings.engine
    timeouts = StoreTimeouts(config.store_connect_timeout_s, config.store_read_timeout_s, PROBE_ATTEMPTS)
    try:
        probe_store(config.store_dir, timeouts)
    except StoreUnavailable as error:
        logger.debug("the store probe failed", exc_info=error)
        problem = f"expected a store this process can reach, list and write; found {error}"
        raise StartupError("store_dir", config.store_dir, problem) from error
    except StoreError as error:  # the location itself: it says what it expected
        raise StartupError("store_dir", config.store_dir, str(error)) from error


def check_model(model: str | None) -> None:
    """None is the built-in backbone; a path must be a directory; anything else must resolve as a hub id."""
    if model is None:
        return
    path = Path(model).expanduser()
    if path.exists() or looks_like_a_path(model):
        if not path.is_dir():
            found = "a file" if path.exists() else "no such directory"
            raise StartupError("model", model, f"expected a model directory or a Hugging Face id; found {found}")
        if not (path / "config.json").is_file():
            raise StartupError("model", model, "expected a model directory with config.json; found none in it")
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise StartupError(
                "model", model, "expected a tokenizer saved beside the model (tokenizer.json or tokenizer_config.json, "
                "as tokenizer.save_pretrained writes them); found none in it"
            )  # fmt: skip
        return
    resolve_hub_id(model)


def looks_like_a_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or model.count("/") > 1


def resolve_hub_id(model: str) -> None:
    """The id is well formed and its config.json resolves (downloaded, or already cached when offline)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError

    try:
        hf_hub_download(model, "config.json")
    except HFValidationError as error:
        problem = str(error).splitlines()[0]
        raise StartupError(
            "model", model, f"expected a model directory or a Hugging Face id; found {problem}"
        ) from None
    except Exception as error:  # not found, gated, offline and not cached, no network: the hub's own words
        logger.debug("resolving the model failed", exc_info=error)
        problem = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StartupError("model", model, f"expected a Hugging Face id that resolves; found {problem}") from None
