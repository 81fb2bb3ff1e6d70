"""Tiny encoder backbones (BERT, RoBERTa, ELECTRA, DeBERTa-v2) with classification heads, and PEFT `SEQ_CLS`/`TOKEN_CLS`
adapters of every prompt-learning kind PEFT can apply (issue 13).

As in tests/fixtures.py: random weights from configs, saved with `save_pretrained`, the byte-level tokenizer
(inputs are `<s> bytes </s>`: <s> plays [CLS], </s> plays [SEP]), so nothing is downloaded.

What PEFT 0.21.2 does on transformers 5.24 (verified by running it, see tests/engine/test_nlu_reference.py):

- prompt tuning and P-tuning: P virtual embeddings (P-tuning saves its encoder's output as `prompt_embeddings`)
  are prepended to `inputs_embeds`, ones to the attention mask. Positions then count the virtual tokens (BERT
  0..P+L-1; RoBERTa padding_idx+1.. from `inputs_embeds`, which ignores padding). Token logits are NOT trimmed:
  PEFT returns P+L rows, the first P for the virtual tokens.
- prefix tuning (P-Tuning v2): PEFT's forward raises "Model does not support past key values" for every backbone
  here (transformers 5.x renamed `past_key_values` to `cache`, PEFT inspects the signature). The reference runs
  what PEFT's `_prefix_tuning_forward` would run: the head model with `cache=peft_model.get_prompt(batch)` and the
  mask extended by P ones; BERT/RoBERTa positions then start after the prefix (`cache_length` = P). DeBERTa-v2's
  attention takes no cache, so prefix kinds are not built for it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    DebertaV2Config,
    ElectraConfig,
    PretrainedConfig,
    RobertaConfig,
)

from benchmarks.workload import encoder_tokenizer
from server.engine.default_backbone import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID, seeded_model
from server.engine.reference import cache_kwarg
from tests.fixtures import peft_config, strengthen

NLU_ARCHS = ("bert", "roberta", "electra", "deberta_v2")
NLU_HEADS = ("seq", "token")
NLU_ADAPTER_KINDS = ("prompt_tuning", "p_tuning_mlp", "prefix", "prefix_projection")
PREFIX_KINDS = ("prefix", "prefix_projection")
NLU_VIRTUAL_TOKENS = {"prompt_tuning": 5, "p_tuning_mlp": 4, "prefix": 3, "prefix_projection": 6}
NUM_LABELS = 3
HIDDEN, LAYERS, HEADS = 32, 2, 4
MAX_INPUT = 128


def nlu_kinds(arch: str) -> tuple[str, ...]:
    """The kinds PEFT can apply: DeBERTa-v2's attention takes no past keys/values, so no prefix tuning there."""
    return tuple(k for k in NLU_ADAPTER_KINDS if arch != "deberta_v2" or k not in PREFIX_KINDS)


def nlu_config(arch: str, num_labels: int = NUM_LABELS) -> PretrainedConfig:
    common = {
        "vocab_size": BYTE_VOCAB_SIZE,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": 64,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "num_labels": num_labels,
        "initializer_range": 0.2,  # the default 0.02 makes a random encoder's outputs nearly input-independent
    }
    if arch == "bert":
        return BertConfig(**common, max_position_embeddings=MAX_INPUT)
    if arch == "roberta":
        # RoBERTa's positions start at padding_idx + 1 (257 here): the table must reach past PAD_ID.
        return RobertaConfig(**common, max_position_embeddings=PAD_ID + 1 + MAX_INPUT)
    if arch == "electra":  # its classification head is a module of its own (dense, gelu, out_proj)
        return ElectraConfig(**common, embedding_size=HIDDEN, max_position_embeddings=MAX_INPUT)
    if arch == "deberta_v2":
        return DebertaV2Config(
            **common,
            max_position_embeddings=MAX_INPUT,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,  # as DeBERTa-v3: positions only through relative attention
        )
    raise ValueError(f"unknown NLU arch {arch!r}")


def head_class(head: str):
    if head == "seq":
        return AutoModelForSequenceClassification
    if head == "token":
        return AutoModelForTokenClassification
    raise ValueError(f"unknown head {head!r}")


def write_nlu_backbone(
    arch: str, out_dir: Path, num_labels: int = NUM_LABELS, head: str = "seq", seed: int = 0
) -> Path:
    """Save a seeded random `AutoModelFor{Sequence,Token}Classification` (its encoder loads with `AutoModel`, the
    random head is the 'bare head') and the tokenizer."""
    model = seeded_model(head_class(head), nlu_config(arch, num_labels), seed)
    strengthen(model, seed)
    model.save_pretrained(out_dir)
    encoder_tokenizer().save_pretrained(out_dir)
    return out_dir


def write_nlu_adapter(
    backbone_dir: Path, head: str, kind: str, out_dir: Path, num_virtual_tokens: int, seed: int
) -> Path:
    """Randomise the prompt weights and the task's head (PEFT's `modules_to_save` copy), save with PEFT."""
    torch.manual_seed(seed)
    base = head_class(head).from_pretrained(backbone_dir)
    model = get_peft_model(base, peft_config(kind, num_virtual_tokens, "SEQ_CLS" if head == "seq" else "TOKEN_CLS"))
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.normal_(0.0, 1.0)
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(out_dir)
    return out_dir


def load_nlu_peft(backbone_dir: Path, head: str, adapter_dir: Path | None) -> torch.nn.Module:
    """The bare head model (adapter_dir None) or a PeftModel over it, in eval mode, float32."""
    base = head_class(head).from_pretrained(backbone_dir, dtype=torch.float32).eval()
    return base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir).eval()


@torch.no_grad()
def peft_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """PEFT's forward; for prefix kinds what `_prefix_tuning_forward` would run were its signature check not stale."""
    if not isinstance(model, PeftModel):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    config = model.active_peft_config
    if config.peft_type.value != "PREFIX_TUNING":
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    batch = input_ids.shape[0]
    mask = torch.cat([torch.ones(batch, config.num_virtual_tokens, dtype=attention_mask.dtype), attention_mask], 1)
    prefix = {cache_kwarg(model.base_model): model.get_prompt(batch)}  # the name this transformers takes
    return model.base_model(input_ids=input_ids, attention_mask=mask, **prefix).logits


@torch.no_grad()
def nlu_reference(backbone_dir: Path, adapter_dir: Path | None, texts: list[str], head: str) -> list[torch.Tensor]:
    """Probabilities per text, each text run alone (no padding): `head="seq"` gives (num_labels,); `"token"`
    gives one row per position as PEFT outputs them: P virtual rows first for prompt tuning / P-tuning, none for
    prefix kinds (and none without an adapter), then one per input token including <s> and </s>."""
    model = load_nlu_peft(backbone_dir, head, adapter_dir)
    tokenizer = encoder_tokenizer()
    out = []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        logits = peft_logits(model, ids, torch.ones_like(ids))
        out.append(torch.softmax(logits.float(), dim=-1)[0])
    return out
