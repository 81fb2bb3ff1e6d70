"""The architecture matrix: a tiny random model of each family people serve, with each family's quirk set explicitly.

Every causal family is built from transformers' own config class (two layers, hidden 64, the byte vocabulary), with
weights large enough that positions, biases, norms and scales all move the logits (`tests.fixtures.strengthen`; the
tests assert it), saved and loaded back through `from_pretrained`. `tests/engine/test_architectures.py` serves each
with every adapter kind the engine serves on it, mixed in one batch, and holds tokens and log-probabilities to PEFT's
own forward without a cache. The table of docs/models.md is generated from this module (`python -m tests.architectures`
rewrites it) and a test fails when the two disagree.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import transformers
from packaging.version import Version
from transformers import PretrainedConfig

from server.engine.default_backbone import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID
from tests.fixtures import write_strong_backbone

CAUSAL_KINDS = ("prompt_tuning", "p_tuning_mlp", "prefix")
SLIDING_WINDOW = 6  # shorter than the matrix's inputs, so the window decides what a token sees
LONG_TEXT = "sliding windows see only the last few tokens"  # longer than SLIDING_WINDOW + any prefix


@dataclass(frozen=True, slots=True)
class Family:
    """One row of the matrix: a config class and its quirk, the adapter kinds served on it, the models page's note."""

    name: str
    config_class: str  # in transformers
    quirk: dict[str, Any] = field(default_factory=dict)  # the family's defining settings, set explicitly
    kinds: tuple[str, ...] = CAUSAL_KINDS
    note: str = ""
    sizes: dict[str, Any] = field(default_factory=dict)  # size fields under the family's own names
    peft: dict[str, Any] = field(default_factory=dict)  # what PEFT cannot read off the config (MPT's head count)
    alibi: bool = False  # positions from the keys' order (ALiBi), not from position ids
    min_transformers: str = ""  # the first transformers whose layers take the engine's attention ("": the range's)

    def skip_reason(self) -> str | None:
        """Why this transformers cannot serve the family (None: it can)."""
        installed = Version(importlib.metadata.version("transformers"))
        if self.min_transformers and installed < Version(self.min_transformers):
            return (
                f"{self.name} takes the engine's attention from transformers {self.min_transformers} on ({installed})"
            )
        return None

    def config(self) -> PretrainedConfig:
        config_class = getattr(transformers, self.config_class)
        common = {
            "vocab_size": BYTE_VOCAB_SIZE,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 512,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
            "tie_word_embeddings": False,
            "initializer_range": 0.2,
        }
        return config_class(**{**common, **self.sizes, **self.quirk})


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

GQA = {"num_key_value_heads": 2}  # grouped-query attention, where the family has it

CAUSAL_FAMILIES: tuple[Family, ...] = (
    Family("Llama", "LlamaConfig", {**GQA, "rope_parameters": LLAMA3_ROPE}, note="`llama3` RoPE scaling"),
    Family("Qwen2", "Qwen2Config", GQA),
    Family("Qwen3", "Qwen3Config", {**GQA, "head_dim": 16}),
    Family("Mistral", "MistralConfig", {**GQA, "sliding_window": SLIDING_WINDOW}, note="sliding window"),
    Family(
        "Mixtral",
        "MixtralConfig",
        {**GQA, "num_local_experts": 4, "num_experts_per_tok": 2},
        note="mixture of experts; LoRA and IA3 on its attention (the experts: refused)",
    ),
    Family("Gemma", "GemmaConfig", {**GQA, "head_dim": 16}),
    Family(
        "Gemma-2",
        "Gemma2Config",
        {
            **GQA,
            "head_dim": 16,
            "sliding_window": SLIDING_WINDOW,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 16,
        },
        note="attention logit softcapping, alternating sliding window",
    ),
    Family(
        "Gemma-3",
        "Gemma3TextConfig",
        {**GQA, "head_dim": 16, "sliding_window": SLIDING_WINDOW},
        note="local and global layers, sliding window",
    ),
    Family("Phi-3", "Phi3Config", GQA),
    Family("OLMo-2", "Olmo2Config", GQA),
    Family(
        "Granite",
        "GraniteConfig",
        {
            **GQA,
            "attention_multiplier": 0.3,
            "residual_multiplier": 0.7,
            "embedding_multiplier": 2.0,
            "logits_scaling": 0.5,
        },
    ),
    Family("GPT-NeoX", "GPTNeoXConfig", {"rotary_pct": 0.5, "use_parallel_residual": True}, note="partial RoPE"),
    Family(
        "OPT",
        "OPTConfig",
        {"ffn_dim": 128, "word_embed_proj_dim": 64, "init_std": 0.2},
        note="learned positions (offset 2)",
    ),
    Family("SmolLM3", "SmolLM3Config", {**GQA, "no_rope_layer_interval": 2}, note="RoPE on some layers only"),
    Family("GLM", "GlmConfig", {**GQA, "head_dim": 16, "partial_rotary_factor": 0.5}, note="partial RoPE"),
    Family("GLM-4", "Glm4Config", {**GQA, "head_dim": 16, "partial_rotary_factor": 0.5}, note="partial RoPE"),
    Family(
        "Cohere", "CohereConfig", {**GQA, "logit_scale": 0.5, "use_qk_norm": False}, note="parallel block, logit scale"
    ),
    Family(
        "GPT-J",
        "GPTJConfig",
        {"rotary_dim": 8, "n_positions": 512},
        note="partial RoPE, interleaved; transformers 5.24 or later",
        min_transformers="5.24",
    ),
    Family("GPT-2", "GPT2Config", {"n_positions": 512, "n_inner": 128}, note="learned positions, Conv1D"),
    Family("Bloom", "BloomConfig", note="ALiBi, in its own attention (wrapped)", alibi=True),
    Family(
        "Falcon (ALiBi)",
        "FalconConfig",
        {"alibi": True, "multi_query": False, "new_decoder_architecture": False, "parallel_attn": False, "bias": True},
        note="ALiBi as its default SDPA attention scales it, in its own attention (wrapped)",
        alibi=True,
    ),
    Family(
        "Falcon (new decoder architecture)",
        "FalconConfig",
        {"alibi": False, "new_decoder_architecture": True, "num_kv_heads": 2},
        note="RoPE, grouped key-value heads held per query head as Falcon does, in its own attention (wrapped)",
    ),
    Family(
        "Falcon (multi-query)",
        "FalconConfig",
        {"alibi": False, "multi_query": True, "new_decoder_architecture": False, "parallel_attn": True},
        kinds=("prompt_tuning", "p_tuning_mlp"),
        note="RoPE, one key-value head, in its own attention (wrapped); no prefix tasks: PEFT's prefix holds a key "
        "per query head, its attention one (PEFT's forward fails)",
    ),
    Family(
        "MPT",
        "MptConfig",
        {"max_seq_len": 512, "attn_config": {"clip_qkv": 4.0}},
        note="ALiBi, `clip_qkv`, in its own attention (wrapped); `qk_ln` and a non-default `alibi_bias_max` refused",
        peft={"num_attention_heads": 4},
        alibi=True,
    ),
)


def write_family(family: Family, directory: Path, seed: int = 1234) -> Path:
    """Save a seeded random, strengthened model of the family and the byte tokenizer, for `from_pretrained`."""
    return write_strong_backbone(family.config(), directory, seed)


KIND_NAMES = {"prompt_tuning": "prompt tuning", "p_tuning_mlp": "P-tuning", "prefix": "prefix tuning"}
# LoRA and IA3 on every causal family (tests/engine/test_architectures.py: every linear layer, a mixture's attention),
# on the encoder-decoders and the encoders tests/engine/test_lora_kinds.py serves them on
MODULE_KINDS = "LoRA, IA3"


@dataclass(frozen=True, slots=True)
class Listed:
    """A row of the models page's table that is not a causal family built here (its tests name it)."""

    name: str
    config_class: str
    served: str  # the adapter kinds and heads served, or "refused"
    note: str


def seq2seq_rows() -> list[Listed]:
    from tests.engine.test_lora_kinds import SEQ2SEQ_ADAPTERS
    from tests.seq2seq_fixtures import SEQ2SEQ_ADAPTER_KINDS, SEQ2SEQ_ARCHS, seq2seq_config

    kinds = kind_names(SEQ2SEQ_ADAPTER_KINDS) + " (decoder)"
    notes = {"t5": "relative position bias per row", "bart": "learned decoder positions per row"}
    names = {"t5": "T5", "mt5": "mT5", "bart": "BART", "mbart": "mBART"}
    return [Listed(names[a], type(seq2seq_config(a)).__name__,
                   kinds + (f", {MODULE_KINDS}" if a in SEQ2SEQ_ADAPTERS else ""), notes.get(a.removeprefix("m"), ""))
            for a in SEQ2SEQ_ARCHS]  # fmt: skip


def encoder_rows() -> list[Listed]:
    from tests.engine.test_lora_kinds import LORA_ENCODERS
    from tests.nlu_fixtures import NLU_ARCHS, nlu_config, nlu_kinds

    names = {"bert": "BERT", "roberta": "RoBERTa", "electra": "ELECTRA", "deberta_v2": "DeBERTa-v2"}
    notes = {"deberta_v2": "its own attention: rows padded, no prefix tasks"}
    lora = f", {MODULE_KINDS} (sequence head)"
    rows = [Listed(names[a], type(nlu_config(a)).__name__,
                   kind_names(nlu_kinds(a)) + (lora if a in LORA_ENCODERS else "") + "; sequence and token heads",
                   notes.get(a, "")) for a in NLU_ARCHS]  # fmt: skip
    distilbert = "layers without a layer index: rows padded on SDPA; its sequence head adds layers of its own"
    return [*rows, Listed("DistilBERT", "DistilBertConfig", "prompt tuning, P-tuning; token heads", distilbert)]


REFUSED = (
    Listed("StableLM", "StableLmConfig", "refused", "its decoder layers drop the attention's keyword arguments"),
    Listed("ALBERT", "AlbertConfig", "refused", "input embeddings narrower than its hidden states"),
)


def kind_names(kinds: tuple[str, ...]) -> str:
    names = [KIND_NAMES[k] for k in kinds if k in KIND_NAMES]
    return ", ".join(dict.fromkeys(names))


def models_table() -> str:
    """The models page's table: every family the tests serve (exact against PEFT), then those refused."""
    causal = [Listed(f.name, f.config_class, f"{kind_names(f.kinds)}, {MODULE_KINDS}", f.note) for f in CAUSAL_FAMILIES]
    rows = [*causal, *seq2seq_rows(), *encoder_rows(), *REFUSED]
    lines = ["| family | config class | adapter kinds served | notes |", "|---|---|---|---|"]
    lines += [f"| {r.name} | `{r.config_class}` | {r.served} | {r.note} |" for r in rows]
    return "\n".join(lines)


MODELS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "models.md"
TABLE_START, TABLE_END = "<!-- models:start -->\n", "\n<!-- models:end -->"


def listed_table(page: str) -> str:
    """The table between the page's markers."""
    return page.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]


def with_table(page: str, table: str) -> str:
    head, rest = page.split(TABLE_START, 1)
    return head + TABLE_START + table + TABLE_END + rest.split(TABLE_END, 1)[1]


if __name__ == "__main__":
    MODELS_PAGE.write_text(with_table(MODELS_PAGE.read_text(), models_table()))
    print(f"{MODELS_PAGE}: the table regenerated from the matrix")
