"""Loads the frozen backbone, detected from its config: a Hugging Face causal LM, an encoder-decoder (T5, BART) or an
encoder (BERT, RoBERTa, ELECTRA, DeBERTa-v2, DistilBERT: classification only), and describes it for the prompt store."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from prompt_store.types import SEQ_CLS, TOKEN_CLS, BackboneFingerprint, ModuleKind, ModuleShape
from server.engine import alibi, cpu_linears, lm_head
from server.engine.attention import ATTENTION_NAME
from server.engine.default_backbone import ensure_default_backbone
from server.engine.errors import UnsupportedBackbone, first_line
from server.engine.heads import BareHead, Head
from server.engine.kinds import ModelKind, auto_class, is_encoder_decoder, kind_of, num_decoder_layers

logger = logging.getLogger(__name__)

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
    kind: ModelKind  # a causal LM, an encoder-decoder or an encoder: everything that differs between them
    heads: dict[str, Head] = field(default_factory=dict)  # task type -> head (classification task types served)
    bare_head: BareHead | None = None  # the checkpoint's own trained head: classification with no task
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # by the names PEFT adapts (LoRA, IA3 targets)
    onednn_linears: int = 0  # shared-pass linear layers run through oneDNN on the CPU (cpu_linears.py)

    @property
    def num_token_ids(self) -> int:
        """Rows of the model's input embedding table: every token id it can read is below this."""
        weight = self.model.get_input_embeddings().weight  # [vocab, H]
        assert isinstance(weight, torch.Tensor)
        return int(weight.shape[0])

    @property
    def position_room(self) -> int | None:
        """Positions a row's tokens can take (None: no fixed limit)."""
        return None if self.max_positions is None else self.max_positions - self.kind.first_position


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
        num_key_value_heads=alibi.num_kv_heads(config) or getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        is_encoder_decoder=is_encoder_decoder(config),
        num_decoder_layers=num_decoder_layers(config),
        modules=module_shapes(model),
    )


def module_shapes(model: torch.nn.Module) -> tuple[ModuleShape, ...]:
    """Every module of the model as PEFT names the ones it adapts (read before the engine wraps any)."""
    return tuple(module_shape(name, module) for name, module in model.named_modules() if name)


def module_shape(name: str, module: torch.nn.Module) -> ModuleShape:
    type_name = type(module).__name__
    if ".experts." in f".{name}" and isinstance(module, torch.nn.Linear | Conv1D):
        return ModuleShape(name, ModuleKind.EXPERT, type_name)
    if isinstance(module, torch.nn.Linear):
        return ModuleShape(name, ModuleKind.LINEAR, type_name, module.in_features, module.out_features)
    if isinstance(module, Conv1D):  # weight [in, out]
        return ModuleShape(name, ModuleKind.CONV1D, type_name, *module.weight.shape)
    if isinstance(module, torch.nn.Embedding):
        return ModuleShape(name, ModuleKind.EMBEDDING, type_name)
    return ModuleShape(name, ModuleKind.OTHER, type_name)


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
    model_id: str | None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    linears: cpu_linears.CpuLinears = "auto",
) -> Backbone:
    """Load the backbone frozen and in eval mode; with no model id, the built-in default backbone. `linears`: how a
    float32 backbone's shared-pass linear layers run on the CPU (cpu_linears.py)."""
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
    fingerprint = fingerprint_of(model)  # before the engine wraps any attention layer: the names PEFT adapts
    modules = dict(model.named_modules())
    if own is not None:
        alibi.install(model)
    lm_head.install(model)  # float32 logits from a half-precision head
    kind = kind_of(model)
    if (reason := kind.why_unserved(model)) is not None:
        raise UnsupportedBackbone(f"{architecture_name(config)}: {reason}; {SERVED_LIST}")
    missing = set(loading["missing_keys"])
    backbone = Backbone(
        model_id=model_id or "promptserve/default",
        model=model,
        tokenizer=tokenizer,
        fingerprint=fingerprint,
        device=torch_device,
        dtype=torch_dtype,
        eos_token_ids=eos_token_ids(model, tokenizer),
        max_positions=max_positions_of(model),
        kind=kind,
        modules=modules,
    )
    warn_unreadable_tokens(backbone)
    backbone = with_heads(backbone, missing, TOKEN_CLS if auto is AutoModelForTokenClassification else SEQ_CLS)
    packed = cpu_linears.install(shared_linear_layers(backbone), torch_device, linears)
    return replace(backbone, onednn_linears=packed)


def shared_linear_layers(backbone: Backbone) -> list[torch.nn.Linear]:
    """The plain float32 linear layers of the shared pass (heads and the output layer run apart): what
    cpu_linears may run through oneDNN."""
    shared = [module.name for module in backbone.fingerprint.modules if module.kind is ModuleKind.LINEAR]
    return cpu_linears.shared_linears(backbone.modules, shared)


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


def with_heads(backbone: Backbone, missing: set[str], loaded_type: str) -> Backbone:
    """The classification heads the backbone's kind serves (PEFT `SEQ_CLS` on a causal LM reads its last token; an
    encoder's sequence and token heads), and what the store must know of them."""
    config = backbone.model.config
    heads, bare = backbone.kind.heads(config, backbone.model, missing, loaded_type)
    fingerprint = replace(
        backbone.fingerprint,
        is_encoder=not backbone.kind.generates,
        takes_prefix=backbone.kind.takes_prefix() and alibi.takes_prefix(config),
        heads=tuple(head.spec for head in heads.values()),
        modules=outside_shared_pass(backbone, heads),
    )
    return replace(backbone, fingerprint=fingerprint, heads=heads, bare_head=bare)


def outside_shared_pass(backbone: Backbone, heads: dict[str, Head]) -> tuple[ModuleShape, ...]:
    """The backbone's modules, those the engine runs apart from the shared pass marked HEAD (an adapter cannot reach
    them there): the output layer (it sees only the positions read out), a head and the pooler it reads through."""
    names = output_layer_names(backbone.modules, backbone.model.get_output_embeddings())
    names |= {name for head in heads.values() for name in (head.module_name, head.pooler_name) if name}
    return marked_apart(backbone.fingerprint, names)


def output_layer_names(modules: dict[str, torch.nn.Module], output: torch.nn.Module | None) -> set[str]:
    return {name for name, module in modules.items() if output is not None and module is output}


def marked_apart(fingerprint: BackboneFingerprint, names: set[str]) -> tuple[ModuleShape, ...]:
    """The fingerprint's modules, those named (and the modules inside them) marked HEAD."""
    return tuple(
        replace(module, kind=ModuleKind.HEAD) if any(module.name == n or module.name.startswith(n + ".") for n in names)
        else module
        for module in fingerprint.modules
    )  # fmt: skip


def generation_fingerprint(model: PreTrainedModel) -> BackboneFingerprint:
    """A causal LM's fingerprint as the server's store sees it (`with_heads`): its output layer runs apart from the
    shared pass, so an adapter cannot target it; for what is checked before the server loads the model."""
    fingerprint = fingerprint_of(model)
    names = output_layer_names(dict(model.named_modules()), model.get_output_embeddings())
    return replace(fingerprint, modules=marked_apart(fingerprint, names))
