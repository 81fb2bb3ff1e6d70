"""Loads the frozen backbone, detected from its config: a Hugging Face causal LM, an encoder-decoder (T5, BART) or an
encoder (BERT, RoBERTa, ELECTRA, DeBERTa-v2, DistilBERT: classification only), and describes it for the prompt store."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from prompt_store.types import SEQ_CLS, TOKEN_CLS, BackboneFingerprint
from server.engine import alibi
from server.engine.attention import ATTENTION_NAME, Routing, attention_routing, unrouted_attention
from server.engine.default_backbone import ensure_default_backbone
from server.engine.errors import UnsupportedBackbone, first_line
from server.engine.heads import BareHead, Head, bare_head, build_head
from server.engine.seq2seq import Seq2Seq, seq2seq_of
from server.engine.types import KindName

logger = logging.getLogger(__name__)

STOCK_ATTENTION = "sdpa"
SERVED_ENCODERS = (
    "Encoders served: BERT, RoBERTa, ELECTRA (base, large) and DeBERTa-v2 (sequence and token heads), DistilBERT "
    "(token heads); prefix tuning where the attention takes past keys and values (BERT, RoBERTa, ELECTRA)"
)
SERVED_LIST = "served architectures: docs/models.md"
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
    encoder: Encoder | None = None  # an encoder (BERT, RoBERTa, DeBERTa-v2, ...): how its rows run
    heads: dict[str, Head] = field(default_factory=dict)  # task type -> head (classification task types served)
    bare_head: BareHead | None = None  # the checkpoint's own trained head: classification with no task

    @property
    def num_token_ids(self) -> int:
        """Rows of the model's input embedding table: every token id it can read is below this."""
        weight = self.model.get_input_embeddings().weight  # [vocab, H]
        assert isinstance(weight, torch.Tensor)
        return int(weight.shape[0])

    @property
    def kind(self) -> KindName:
        if self.encoder is not None:
            return "encoder"
        return "seq2seq" if self.seq2seq is not None else "causal"


@dataclass(frozen=True, slots=True)
class Encoder:
    """An encoder's rows: packed into one stream through the engine's attention (`packed`: prefixes apply), or,
    for an encoder whose attention cannot use the pool (DeBERTa-v2's is its own; DistilBERT's layers have no
    layer_idx, so they run on SDPA), padded into one batch with an attention mask (prompt tasks only).
    `position_offset`: its first position id (RoBERTa counts from padding_idx + 1)."""

    packed: bool
    position_offset: int


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


def is_encoder_config(config: PretrainedConfig) -> bool:
    """An encoder: a masked-LM family used as such (BERT and RoBERTa also have causal variants: is_decoder)."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


def fingerprint_of(model: PreTrainedModel) -> BackboneFingerprint:
    config = model.config.get_text_config()
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return BackboneFingerprint(
        model_type=config.model_type,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=alibi.num_kv_heads(config) or getattr(config, "num_key_value_heads", None) or num_heads,
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
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return frozenset()
    return frozenset([configured] if isinstance(configured, int) else configured)


def max_positions_of(model: PreTrainedModel) -> int | None:
    config = model.config.get_text_config()
    return (
        getattr(config, "max_position_embeddings", None)
        or getattr(config, "n_positions", None)
        or getattr(config, "max_seq_len", None)  # MPT: its ALiBi table is this long
    )


def load_backbone(
    model_id: str | None, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False
) -> Backbone:
    """Load the backbone frozen and in eval mode; with no model id, the built-in default backbone."""
    source = model_id or str(ensure_default_backbone())
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    logger.info("loading backbone %s on %s in %s", source, torch_device, torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    auto = auto_class(config)
    if (reason := alibi.refusal(config)) is not None:
        raise UnsupportedBackbone(f"{architecture_name(config)}: {reason}; {SERVED_LIST}")
    own = alibi.stock_attention(config)  # a family whose attention layers the engine wraps (server/engine/alibi.py)
    if own is None:
        refuse_unbuildable(config, auto, trust_remote_code)
    model, loading = auto.from_pretrained(
        source,
        dtype=torch_dtype,
        attn_implementation=own or ATTENTION_NAME,
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
    )
    model.to(torch_device)  # type: ignore[arg-type]  # transformers' stub types `to` as a method wrapper
    model.eval().requires_grad_(False)
    if own is not None:
        alibi.install(model)
    if auto is AutoModelForCausalLM and (reason := unrouted_attention(model, alibi.num_kv_heads(config))) is not None:
        raise UnsupportedBackbone(f"{architecture_name(config)}: {reason}; {SERVED_LIST}")
    missing = set(loading["missing_keys"])
    backbone = Backbone(
        model_id=model_id or "promptserve/default",
        model=model,
        tokenizer=tokenizer,
        fingerprint=fingerprint_of(model),
        device=torch_device,
        dtype=torch_dtype,
        eos_token_ids=eos_token_ids(model, tokenizer),
        max_positions=max_positions_of(model),
        seq2seq=seq2seq_of(model) if model.config.is_encoder_decoder else None,
        encoder=encoder_of(model) if is_encoder_config(config) else None,
    )
    warn_unreadable_tokens(backbone)
    return with_heads(backbone, missing, TOKEN_CLS if auto is AutoModelForTokenClassification else SEQ_CLS)


def unreadable_token_ids(backbone: Backbone) -> list[int]:
    """Token ids the tokenizer can produce that have no row in the model's embedding table (tokens added to the
    tokenizer without `resize_token_embeddings`)."""
    limit = backbone.num_token_ids
    return sorted(token_id for token_id in backbone.tokenizer.get_vocab().values() if token_id >= limit)


def warn_unreadable_tokens(backbone: Backbone) -> None:
    """Served anyway: a request holding one of these tokens is refused at intake (400), the rest are served."""
    unreadable = unreadable_token_ids(backbone)
    if unreadable:
        shown = ", ".join(f"{i} ({backbone.tokenizer.convert_ids_to_tokens(i)!r})" for i in unreadable[:10])
        more = f" and {len(unreadable) - 10} more" if len(unreadable) > 10 else ""
        logger.warning(
            "the tokenizer of %s has %d token(s) the model's %d-row embedding table cannot read: %s%s; requests "
            "holding them are refused",
            backbone.model_id, len(unreadable), backbone.num_token_ids, shown, more,
        )  # fmt: skip


def auto_class(config: PretrainedConfig) -> Any:
    if getattr(config, "is_encoder_decoder", False):
        return AutoModelForSeq2SeqLM
    if not is_encoder_config(config):
        return AutoModelForCausalLM
    # an encoder loads with its checkpoint's head (its pooler, and a trained head it can serve with no task)
    architectures = getattr(config, "architectures", None) or []
    if any(name.endswith("ForTokenClassification") for name in architectures):
        return AutoModelForTokenClassification
    return AutoModelForSequenceClassification


def architecture_name(config: PretrainedConfig) -> str:
    architectures = getattr(config, "architectures", None) or []
    return architectures[0] if architectures else f"a {config.model_type} model"


def refuse_unbuildable(config: PretrainedConfig, auto: Any, trust_remote_code: bool) -> None:
    """Before any weight loads: the model's skeleton, on the meta device, must build with the engine's attention
    (Falcon's layers pick their attention class from a fixed table, and have no place for it). Any other failure
    to build is not judged here: the load that follows reports it as it would."""
    try:
        with torch.device("meta"):
            auto.from_config(config, attn_implementation=ATTENTION_NAME, trust_remote_code=trust_remote_code)
    except KeyError as error:
        if error.args != (ATTENTION_NAME,):
            logger.debug("building %s on the meta device failed", architecture_name(config), exc_info=error)
            return
        reason = "its attention layers cannot be replaced (transformers builds them from a fixed table)"
        raise UnsupportedBackbone(f"{architecture_name(config)}: {reason}; {SERVED_LIST}") from None
    except Exception as error:
        if "attn_implementation" not in str(error) and "attention" not in str(error).lower():
            logger.debug("building %s on the meta device failed", architecture_name(config), exc_info=error)
            return
        reason = f"transformers cannot build it with a custom attention function ({first_line(error)})"
        raise UnsupportedBackbone(f"{architecture_name(config)}: {reason}; {SERVED_LIST}") from None


def encoder_of(model: PreTrainedModel) -> Encoder:
    check_input_width(model)
    padding_idx = getattr(getattr(model.base_model, "embeddings", None), "padding_idx", None)
    offset = padding_idx + 1 if padding_idx is not None else 0  # RoBERTa's embeddings keep it; BERT's do not
    routing = attention_routing(model.base_model)
    if routing is Routing.STOCK:  # padded rows need transformers' own attention, which reads the padding mask
        model.set_attn_implementation(STOCK_ATTENTION)  # type: ignore[operator]
    return Encoder(packed=routing is Routing.POOL, position_offset=offset)


def check_input_width(model: PreTrainedModel) -> None:
    """A prompt task's vectors are hidden_size wide (PEFT's token_dim, as the store checks them): an encoder whose
    input embeddings are narrower (ALBERT's and ELECTRA-small's embedding_size) could take none of them."""
    config = model.config.get_text_config()
    width = model.get_input_embeddings().embedding_dim
    if width != config.hidden_size:
        raise UnsupportedBackbone(
            f"expected an encoder whose input embeddings are as wide as its hidden states ({config.hidden_size}), "
            f"as prompt tasks' vectors are; found {config.model_type} with {width}-wide input embeddings "
            f"(embedding_size). {SERVED_ENCODERS}"
        )


def with_heads(backbone: Backbone, missing: set[str], loaded_type: str) -> Backbone:
    """The classification heads the backbone serves: an encoder's sequence and token heads, a causal LM's sequence
    head (PEFT `SEQ_CLS` on a causal LM reads its last token); none on an encoder-decoder."""
    if backbone.seq2seq is not None:
        return backbone
    model, config = backbone.model, backbone.model.config
    task_types = (SEQ_CLS, TOKEN_CLS) if backbone.encoder is not None else (SEQ_CLS,)
    heads = {t: head for t in task_types if (head := build_head(config, t, model, missing)) is not None}
    if backbone.encoder is not None and not heads:
        raise UnsupportedBackbone(
            f"expected an encoder whose sequence or token classification head promptserve can run; found "
            f"{config.model_type}, whose heads apply layers of their own (see the warnings above). {SERVED_ENCODERS}"
        )
    bare = None
    if backbone.encoder is not None and loaded_type in heads:
        bare = bare_head(config, loaded_type, model, heads[loaded_type], missing)
    fingerprint = replace(
        backbone.fingerprint,
        is_encoder=backbone.encoder is not None,
        takes_prefix=(backbone.encoder is None or backbone.encoder.packed) and alibi.takes_prefix(config),
        heads=tuple(head.spec for head in heads.values()),
    )
    return replace(backbone, fingerprint=fingerprint, heads=heads, bare_head=bare)
