"""The P-Tuning v2 recipe of docs/classification.md on the pinned PEFT and transformers: PEFT's own prefix forward
raises there ("Model does not support past key values"), so the recipe runs what it would run. A few steps on a tiny
RoBERTa, saved with `save_pretrained`, registered, and served as the trained model answers (float32, 1e-5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PrefixTuningConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from prompt_store.registry import TaskStore
from server.engine.backbone import load_backbone
from server.engine.reference import cache_kwarg
from tests.engine.test_nlu import ATOL, Driver
from tests.nlu_fixtures import write_nlu_backbone

DATA = [("I loved this film", 1), ("dull and long", 0)]


def test_the_readme_prefix_recipe_trains_registers_and_serves_as_trained(tmp_path: Path) -> None:
    model_dir = str(write_nlu_backbone("roberta", tmp_path / "roberta"))
    out = tmp_path / "adapters" / "sentiment"
    torch.manual_seed(0)
    # As in docs/classification.md (the tiny backbone's saved head has 3 labels: ignore_mismatched_sizes).
    labels = ["negative", "positive"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(labels), ignore_mismatched_sizes=True
    )
    config = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=16, prefix_projection=False)
    model = get_peft_model(base, config)

    def prefix_forward(batch: Any, **kwargs: Any) -> Any:
        size = batch["input_ids"].shape[0]
        prefix_mask = batch["attention_mask"].new_ones(size, config.num_virtual_tokens)
        mask = torch.cat([prefix_mask, batch["attention_mask"]], dim=1)  # [B, P + T]
        prefix = {cache_kwarg(model.base_model): model.get_prompt(size)}
        return model.base_model(**{**batch, "attention_mask": mask}, **prefix, **kwargs)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for text, label in DATA * 5:
        batch = tokenizer(text, return_tensors="pt")
        loss = prefix_forward(batch, labels=torch.tensor([label])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    model.save_pretrained(out)
    base.config.id2label = dict(enumerate(labels))
    base.config.save_pretrained(out)
    assert sum(losses[-2:]) < sum(losses[:2])  # it learned something

    model.eval()
    with torch.no_grad():
        trained = [torch.softmax(prefix_forward(tokenizer(t, return_tensors="pt")).logits, -1)[0] for t, _ in DATA]
    backbone = load_backbone(model_dir, "cpu", "float32")
    store = TaskStore(tmp_path / "store", backbone.fingerprint)
    store.register_dir("sentiment", out)
    assert store.load("sentiment").record.labels == tuple(labels)
    driver = Driver(backbone, store)
    answers = [driver.classify_probs(text, "sentiment") for text, _ in DATA]
    driver.run()
    for (text, _), answer, expected in zip(DATA, answers, trained, strict=True):
        torch.testing.assert_close(answer(), expected, rtol=0, atol=ATOL, msg=text)
