"""The built-in default backbone: a small Llama (grouped-query attention) with a byte-level tokenizer.

It needs no download: the package ships it pre-trained (made by `python -m server.demo.pretrain`, see
server/demo) and it loads through the same `from_pretrained` path as any Hugging Face model. Should the
assets be missing, a random model of the same shape is created deterministically in a cache directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from server.engine.kinds import auto_class

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE_NAME = "promptserve-random-llama-v2"  # the random fallback's directory in the cache
PRETRAINED_BACKBONE_DIR = Path(__file__).resolve().parents[1] / "demo" / "assets" / "backbone"
BACKBONE_FILES = ("config.json", "model.safetensors", "tokenizer.json")
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
BYTE_VOCAB_SIZE = 259


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer whose ids are the UTF-8 bytes (0-255) plus <pad>, <s> and </s>; adds <s> like Llama's."""
    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    vocab.update({"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def default_backbone_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: two query heads share each KV head
        max_position_embeddings=1024,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )


def default_cache_dir() -> Path:
    root = os.environ.get("PROMPTSERVE_CACHE_DIR") or Path.home() / ".cache" / "promptserve"
    return Path(root)


def is_backbone_dir(directory: Path) -> bool:
    return all((directory / name).is_file() for name in BACKBONE_FILES)


def ensure_default_backbone(cache_dir: Path | None = None) -> Path:
    """Return the directory of the default backbone: the shipped pre-trained one, else the random fallback."""
    if is_backbone_dir(PRETRAINED_BACKBONE_DIR):
        return PRETRAINED_BACKBONE_DIR
    logger.warning("no pre-trained default backbone in %s: using random weights", PRETRAINED_BACKBONE_DIR)
    return ensure_random_backbone(cache_dir)


def ensure_random_backbone(cache_dir: Path | None = None) -> Path:
    """Return the directory of a seeded random backbone of the default shape, creating it (atomically) if needed."""
    target = (cache_dir or default_cache_dir()) / DEFAULT_BACKBONE_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("creating a random backbone of the default shape in %s", target)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        write_random_backbone(default_backbone_config(), staging, seed=0)
        os.replace(staging, target)  # a concurrent creator may have won: then keep theirs
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def seeded_model(auto: Any, config: object, seed: int) -> Any:
    """`auto.from_config(config)` with weights drawn from `seed`, leaving the global random state as it was."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return auto.from_config(config)
    finally:
        torch.random.set_rng_state(generator_state)


def write_random_backbone(
    config: PretrainedConfig, directory: Path, seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None
) -> Path:
    """Save a model (causal, or an encoder-decoder when the config says so) with seeded random weights and a
    tokenizer (the byte tokenizer unless given), loadable by `from_pretrained`."""
    auto = auto_class(config)
    model = seeded_model(auto, config, seed)
    model.save_pretrained(directory)
    (tokenizer or byte_tokenizer()).save_pretrained(directory)
    return directory
