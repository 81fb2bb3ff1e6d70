"""Loads the frozen backbone (a Hugging Face causal LM, or an encoder-decoder such as T5 or BART, detected from its
config) and describes it for the prompt store."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prompt_store.types import BackboneFingerprint
from server.engine.attention import ATTENTION_NAME
from server.engine.default_backbone import ensure_default_backbone
from server.engine.seq2seq import Seq2Seq, seq2seq_of

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class Backbone:
    model_id: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: BackboneFingerprint
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int]
    max_positions: int | None  # None: the architecture has no fixed limit we know of
    seq2seq: Seq2Seq | None = None  # an encoder-decoder (T5, BART): what its decoding needs

    @property
    def kind(self) -> str:
        return "seq2seq" if self.seq2seq is not None else "causal"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available on this machine")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; found {dtype!r}")
    return DTYPES[dtype]


def fingerprint_of(model: PreTrainedModel) -> BackboneFingerprint:
    config = model.config.get_text_config()
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return BackboneFingerprint(
        model_type=config.model_type,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
        num_decoder_layers=num_decoder_layers(config),
    )


def num_decoder_layers(config: PretrainedConfig) -> int | None:
    """An encoder-decoder's decoder depth (T5: num_decoder_layers, BART: decoder_layers); None for a causal LM."""
    if not getattr(config, "is_encoder_decoder", False):
        return None
    return (
        getattr(config, "num_decoder_layers", None)
        or getattr(config, "decoder_layers", None)
        or config.num_hidden_layers
    )


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return frozenset()
    return frozenset([configured] if isinstance(configured, int) else configured)


def max_positions_of(model: PreTrainedModel) -> int | None:
    config = model.config.get_text_config()
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def load_backbone(
    model_id: str | None, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False
) -> Backbone:
    """Load a causal LM frozen and in eval mode; with no model id, the built-in default backbone."""
    source = model_id or str(ensure_default_backbone())
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    logger.info("loading backbone %s on %s in %s", source, torch_device, torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    model = auto.from_pretrained(
        source, dtype=torch_dtype, attn_implementation=ATTENTION_NAME, trust_remote_code=trust_remote_code
    )
    model.to(torch_device)  # type: ignore[arg-type]  # transformers' stub types `to` as a method wrapper
    model.eval().requires_grad_(False)
    return Backbone(
        model_id=model_id or "promptserve/default",
        model=model,
        tokenizer=tokenizer,
        fingerprint=fingerprint_of(model),
        device=torch_device,
        dtype=torch_dtype,
        eos_token_ids=eos_token_ids(model, tokenizer),
        max_positions=max_positions_of(model),
        seq2seq=seq2seq_of(model) if model.config.is_encoder_decoder else None,
    )
