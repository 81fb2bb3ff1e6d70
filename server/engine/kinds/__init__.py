"""The backbone kinds behind one interface (base.py): a causal LM, an encoder-decoder and an encoder. Which one a
checkpoint is, and the class it loads with, is decided here, from its config, and nowhere else."""

from __future__ import annotations

from typing import Any

from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from server.engine.kinds.base import GENERATION_ROUTES, ModelKind, StepResult
from server.engine.kinds.causal import Causal
from server.engine.kinds.encoder import Encoder
from server.engine.kinds.encoder_decoder import EncoderDecoder
from server.engine.kinds.seq2seq import seq2seq_of

__all__ = [
    "GENERATION_ROUTES",
    "Causal",
    "Encoder",
    "EncoderDecoder",
    "ModelKind",
    "StepResult",
    "auto_class",
    "kind_of",
    "num_decoder_layers",
]


def is_encoder_decoder(config: PretrainedConfig) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def is_encoder(config: PretrainedConfig) -> bool:
    """A masked-LM family used as such (BERT and RoBERTa also have causal variants: is_decoder)."""
    if is_encoder_decoder(config):
        return False
    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


def num_decoder_layers(config: PretrainedConfig) -> int | None:
    """An encoder-decoder's decoder depth (T5: num_decoder_layers, BART: decoder_layers); None for any other."""
    if not is_encoder_decoder(config):
        return None
    return (
        getattr(config, "num_decoder_layers", None)
        or getattr(config, "decoder_layers", None)
        or config.num_hidden_layers
    )


def auto_class(config: PretrainedConfig) -> Any:
    """The transformers class the checkpoint loads with: an encoder with its checkpoint's head (its pooler, and a
    trained head it can serve with no task)."""
    if is_encoder_decoder(config):
        return AutoModelForSeq2SeqLM
    if not is_encoder(config):
        return AutoModelForCausalLM
    architectures = getattr(config, "architectures", None) or []
    if any(name.endswith("ForTokenClassification") for name in architectures):
        return AutoModelForTokenClassification
    return AutoModelForSequenceClassification


def kind_of(model: PreTrainedModel) -> ModelKind:
    """The loaded model's kind, with what its steps need of it."""
    if is_encoder_decoder(model.config):
        return EncoderDecoder(seq2seq_of(model))
    if is_encoder(model.config):
        return Encoder.of(model)
    return Causal()
