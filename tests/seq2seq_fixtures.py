"""Tiny encoder-decoder backbones (T5, BART) and PEFT `SEQ_2_SEQ_LM` adapters of every prompt-learning kind.

As in tests/fixtures.py: random weights from configs, saved with `save_pretrained` and loaded back through
`from_pretrained`, with the byte-level tokenizer, so nothing is downloaded.

The exactness reference is `greedy_seq2seq_reference`: a greedy loop without a KV cache over the model's own
forward. What PEFT 0.21.2 does with each kind on transformers 5.24 (verified by running it):

- prompt tuning and P-tuning: the adapter holds 2P virtual tokens (`num_transformer_submodules=2`), but both
  `forward` and `generate` prepend only the first P to the encoder's `inputs_embeds`; the decoder gets nothing.
- prefix tuning (with or without projection): `forward` puts the prefix in the decoder's self-attention cache
  only (the cross-attention cache is emptied, the encoder never sees it), so decoder positions start at P.
  `generate` loses the prefix: its own `cache` wins over PEFT's `past_key_values` ("Both `past_key_values` and
  `cache` are set"), so it returns the bare backbone's tokens. The reference follows `forward`, which is what
  the adapter was trained with and what `generate` does once the cache reaches the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from tokenizers import processors
from transformers import (
    AutoModelForSeq2SeqLM,
    BartConfig,
    MBartConfig,
    MT5Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    T5Config,
)

from server.engine.default_backbone import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID, byte_tokenizer, seeded_model
from tests.fixtures import TinyBackbone, peft_config, strengthen

SEQ2SEQ_ARCHS = ("t5", "bart", "mt5", "mbart")
T5_STYLE = ("t5", "mt5")  # relative position bias, inputs end with </s>, decoding starts at <pad>
SEQ2SEQ_ADAPTER_KINDS = ("prompt_tuning", "p_tuning_mlp", "prefix", "prefix_projection")
SEQ2SEQ_VIRTUAL_TOKENS = {"prompt_tuning": 5, "p_tuning_mlp": 4, "prefix": 3, "prefix_projection": 6}


def tiny_t5_config() -> T5Config:
    """T5 v1.1 style (gated GELU) as Flan-T5 and Lester et al.'s LM-adapted T5; decoding starts at <pad>.

    transformers 5.24 always ties T5's head to the shared embedding: `tie_word_embeddings=False` (as Flan-T5's
    config says) only turns off the d_model**-0.5 scaling of the decoder's output (`scale_decoder_outputs`).
    """
    return T5Config(
        vocab_size=BYTE_VOCAB_SIZE,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,  # T5's convention
        initializer_factor=2.0,  # the default 1.0 makes a random T5 repeat one token forever
    )


def tiny_bart_config() -> BartConfig:
    """BART's conventions: inputs are <s> ... </s>, decoding starts at </s>; no forced BOS/EOS in generation."""
    return BartConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=256,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=EOS_ID,  # BART's convention
        forced_bos_token_id=None,
        forced_eos_token_id=None,  # BartConfig's default (2) would force byte 2 at max_length
        init_std=0.2,  # twice BART's gentle 0.1; with 0.3 a random tiny BART repeats one token
    )


def seq2seq_config(arch: str) -> PretrainedConfig:
    """T5 and BART, and their multilingual siblings (mT5, mBART: their own classes, the same conventions)."""
    configs = {"t5": tiny_t5_config, "bart": tiny_bart_config}
    if arch not in (*configs, "mt5", "mbart"):
        raise ValueError(f"unknown seq2seq arch {arch!r}")
    config = configs[arch.removeprefix("m")]()
    fields = {k: v for k, v in config.to_dict().items() if k != "model_type"}
    if arch == "mt5":
        return MT5Config(**fields)
    if arch == "mbart":
        return MBartConfig(**fields)
    return config


def seq2seq_tokenizer(arch: str) -> PreTrainedTokenizerFast:
    """The byte-level tokenizer with the arch's special tokens: T5 appends </s>; BART wraps in <s> ... </s>."""
    tokenizer = byte_tokenizer()
    single = "$A </s>" if arch in T5_STYLE else "<s> $A </s>"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} $B </s>", special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)]
    )
    return tokenizer


def sharpen_positions(model: torch.nn.Module) -> None:
    """Make decoder positions matter: a random model's decoder otherwise falls into repeating one token.

    Scales T5's decoder relative-position bias and BART's decoder position embeddings. It also makes a wrong
    decoder position (e.g. forgetting that a prefix shifts BART's positions by P) change the tokens.
    """
    with torch.no_grad():
        if model.config.model_type in T5_STYLE:
            model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(20.0)
        else:
            model.model.decoder.embed_positions.weight.mul_(3.0)


SEEDS = {"t5": 2, "mt5": 2, "bart": 3, "mbart": 3}  # seeds whose strengthened models answer varied tokens


def write_seq2seq_backbone(arch: str, out_dir: Path, seed: int | None = None) -> Path:
    """Save a seeded random, strengthened model and its tokenizer, loadable offline by `from_pretrained`.

    The default seeds give each arch varied greedy tokens on short inputs (with some seeds a random tiny
    encoder-decoder repeats one token for some input).
    """
    seed = SEEDS[arch] if seed is None else seed
    model = seeded_model(AutoModelForSeq2SeqLM, seq2seq_config(arch), seed)
    sharpen_positions(model)
    strengthen(model, seed)
    model.save_pretrained(out_dir)
    seq2seq_tokenizer(arch).save_pretrained(out_dir)
    return out_dir


def write_seq2seq_adapter(backbone_dir: Path, kind: str, out_dir: Path, num_virtual_tokens: int, seed: int) -> Path:
    """Randomise an adapter's trainable weights (so it matters) and save it with PEFT's own save_pretrained."""
    torch.manual_seed(seed)
    base = AutoModelForSeq2SeqLM.from_pretrained(backbone_dir)
    model = get_peft_model(base, peft_config(kind, num_virtual_tokens, "SEQ_2_SEQ_LM"))
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.normal_(0.0, 1.0)
    model.save_pretrained(out_dir)
    return out_dir


def build_tiny_seq2seq_backbone(arch: str, root: Path) -> TinyBackbone:
    """A backbone and one adapter of each kind, as `build_tiny_backbone` does for causal models."""
    path = write_seq2seq_backbone(arch, root / arch)
    backbone = TinyBackbone(arch=arch, path=path)
    for seed, kind in enumerate(SEQ2SEQ_ADAPTER_KINDS):
        out = root / f"{arch}-{kind}"
        backbone.adapters[kind] = write_seq2seq_adapter(path, kind, out, SEQ2SEQ_VIRTUAL_TOKENS[kind], seed=seed)
    return backbone


def load_seq2seq_peft(backbone_dir: Path, adapter_dir: Path | None) -> torch.nn.Module:
    """The bare backbone (adapter_dir None) or a PeftModel over it, in eval mode."""
    base = AutoModelForSeq2SeqLM.from_pretrained(backbone_dir).eval()
    return base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir).eval()


@torch.no_grad()
def greedy_seq2seq_reference(
    model: torch.nn.Module, input_ids: list[int], max_new_tokens: int, eos_id: int | None
) -> list[int]:
    """Greedy tokens for one row: each step runs the full forward (encoder and whole decoder sequence), no cache.

    `model` is a bare seq2seq LM or a PeftModel over one. PEFT's own forward places the adapter (prompt rows
    0..P-1 before the encoder's input embeddings; prefix keys/values in the decoder's self-attention), so this is
    PEFT's behaviour by construction. Returns the new tokens, ending at (and including) EOS if it comes.
    """
    return greedy_seq2seq_logprobs(model, input_ids, max_new_tokens, eos_id)[0]


@torch.no_grad()
def greedy_seq2seq_logprobs(
    model: torch.nn.Module, input_ids: list[int], max_new_tokens: int, eos_id: int | None
) -> tuple[list[int], list[float]]:
    """`greedy_seq2seq_reference`'s tokens and each one's log-probability (float32)."""
    encoder_ids = torch.tensor([input_ids])
    decoder_ids = [model.config.decoder_start_token_id]
    logprobs: list[float] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=encoder_ids, decoder_input_ids=torch.tensor([decoder_ids]), use_cache=False).logits
        row = logits[0, -1].float().log_softmax(dim=-1)
        token = int(row.argmax())
        decoder_ids.append(token)
        logprobs.append(float(row[token]))
        if token == eos_id:
            break
    return decoder_ids[1:], logprobs
