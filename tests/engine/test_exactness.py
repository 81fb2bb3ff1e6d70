"""The product's promise: a row's tokens do not depend on its batch mates, and equal PEFT's own model's.

The reference is PEFT's forward over the whole sequence at every step (no cache, no `generate`); PEFT's `generate`
is compared too wherever it is known to be right."""

from __future__ import annotations

import pytest
import torch

from server.engine.types import EnsembleMode, StepStats
from tests.engine.harness import Harness, token_ids
from tests.fixtures import ADAPTER_KINDS, TinyBackbone
from tests.reference import PEFT_GENERATE_BROKEN, greedy_with_logprobs, peft_generate, peft_greedy, peft_model

TASKS = (*ADAPTER_KINDS, None)
TEXTS = {
    "prompt_tuning": "hello world",
    "p_tuning_mlp": "a",
    "p_tuning_lstm": "zz top, twice",
    "prefix": "the quick brown fox",
    "prefix_projection": "xy",
    None: "a plain row",
}


@pytest.mark.parametrize("task", TASKS)
def test_greedy_tokens_and_logprobs_equal_peft_forward_for_each_kind(harness: Harness, task: str | None):
    input_ids = list(harness.backbone.tokenizer(TEXTS[task])["input_ids"])
    model = peft_model(harness.tiny, task)
    expected, logprobs = greedy_with_logprobs(model, input_ids, 10, harness.backbone.eos_token_ids)
    completion = harness.alone(TEXTS[task], task, max_new_tokens=10)
    assert token_ids(completion) == expected
    served = torch.tensor([token.logprob for token in completion.tokens])
    torch.testing.assert_close(served, torch.tensor(logprobs), rtol=0, atol=1e-4)


@pytest.mark.skipif(PEFT_GENERATE_BROKEN is not None, reason=PEFT_GENERATE_BROKEN or "")
@pytest.mark.parametrize("task", TASKS)
def test_greedy_tokens_equal_peft_generate_where_it_is_right(harness: Harness, task: str | None):
    input_ids = harness.backbone.tokenizer(TEXTS[task])["input_ids"]
    expected = peft_generate(peft_model(harness.tiny, task), input_ids, max_new_tokens=10)
    assert token_ids(harness.alone(TEXTS[task], task, max_new_tokens=10)) == expected


def test_generation_past_the_kv_buffers_spare_room_equals_peft_forward(harness: Harness):
    """More new tokens than a buffer's spare columns: the batch grows mid-flight and stays exact."""
    input_ids = harness.backbone.tokenizer(TEXTS["prefix"])["input_ids"]
    expected = peft_greedy(peft_model(harness.tiny, "prefix"), input_ids, max_new_tokens=50)
    mates = [harness.request(TEXTS[task], task, max_new_tokens=45) for task in TASKS]
    completions = harness.run(harness.request(TEXTS["prefix"], "prefix", max_new_tokens=50), *mates)
    assert token_ids(completions[0]) == expected


def test_mixed_batch_tokens_equal_alone_for_every_kind(harness: Harness):
    alone = {task: token_ids(harness.alone(TEXTS[task], task, max_new_tokens=12)) for task in TASKS}
    mixed = harness.run(*(harness.request(TEXTS[task], task, max_new_tokens=12) for task in TASKS))
    assert {task: token_ids(c) for task, c in zip(TASKS, mixed, strict=True)} == alone
    assert harness.is_idle()


def test_rows_joining_mid_flight_equal_alone(harness: Harness):
    alone = {task: token_ids(harness.alone(TEXTS[task], task, max_new_tokens=12)) for task in TASKS}
    first = [harness.request(TEXTS[task], task, max_new_tokens=12) for task in TASKS[:3]]
    joiners = {
        2: [harness.request(TEXTS[t], t, max_new_tokens=12) for t in TASKS[3:5]],
        5: [harness.request(TEXTS[None])],
    }
    joiners[5][0].max_new_tokens = 12
    completions = harness.run(*first, later=joiners)
    order = [*TASKS[:3], *TASKS[3:5], None]
    assert {task: token_ids(c) for task, c in zip(order, completions, strict=True)} == alone
    assert harness.is_idle()


def test_same_task_many_rows_with_different_lengths_equal_alone(harness: Harness):
    texts = ["a", "longer input text here", "mid length"]
    alone = [token_ids(harness.alone(text, "prefix", max_new_tokens=9)) for text in texts]
    mixed = harness.run(*(harness.request(text, "prefix", max_new_tokens=9) for text in texts))
    assert [token_ids(c) for c in mixed] == alone


def test_seeded_sampling_same_alone_and_mixed(harness: Harness):
    sampling = {"do_sample": True, "temperature": 1.3, "top_k": 50, "top_p": 0.95, "seed": 1234, "max_new_tokens": 12}
    alone = token_ids(harness.alone("sample me", "prompt_tuning", **sampling))
    mates = [harness.request(TEXTS[task], task, do_sample=True, max_new_tokens=12) for task in TASKS]
    mixed = harness.run(*mates[:3], harness.request("sample me", "prompt_tuning", **sampling), *mates[3:])
    assert token_ids(mixed[3]) == alone
    again = token_ids(harness.alone("sample me", "prompt_tuning", **sampling))
    assert again == alone


@pytest.mark.parametrize("mode", [EnsembleMode.VOTE, EnsembleMode.MEAN])
def test_seeded_ensemble_members_same_alone_and_mixed(harness: Harness, mode: EnsembleMode):
    """Each member draws from its own generator: a member whose prefill ends a step before another's (chunks share
    the step's budget with the mates) must not take the draw its sibling takes alone."""
    sampling = {"do_sample": True, "temperature": 1.5, "seed": 77, "max_new_tokens": 12}
    members = ("prefix", "prompt_tuning", "p_tuning_mlp")
    alone = harness.request("sample me", *members, ensemble=mode, **sampling)
    harness.run(alone)
    mates = [harness.request(TEXTS[task], task, do_sample=True, max_new_tokens=12) for task in TASKS]
    mixed = harness.request("sample me", *members, ensemble=mode, **sampling)
    harness.run(*mates[:3], mixed, *mates[3:])
    assert [row.output_ids for row in mixed.rows] == [row.output_ids for row in alone.rows]
    assert len(set(alone.rows[0].output_ids)) > 3  # it really samples


def test_unseeded_sampling_varies(harness: Harness):
    runs = {tuple(token_ids(harness.alone("x", None, do_sample=True, max_new_tokens=12))) for _ in range(4)}
    assert len(runs) > 1


def test_chunked_prefill_beside_decoding_rows_equals_peft_forward(tiny_backbone: TinyBackbone, tmp_path):
    harness = Harness(tiny_backbone, tmp_path / "store", max_batch_tokens=5, kv_block_size=4)
    steps: list[StepStats] = []
    harness.engine.step_listeners.append(steps.append)
    long_text = "a long input, split across steps of five tokens"
    running = harness.request(TEXTS[None], None, max_new_tokens=30)
    joining = harness.request(long_text, "prefix", max_new_tokens=8)
    completions = harness.run(running, later={4: [joining]})
    cases = [(TEXTS[None], None, 30), (long_text, "prefix", 8)]
    for completion, (text, task, new) in zip(completions, cases, strict=True):
        input_ids = harness.backbone.tokenizer(text)["input_ids"]
        assert token_ids(completion) == peft_greedy(peft_model(harness.tiny, task), input_ids, new)
    mixed = [s for s in steps if s.num_prefill_tokens and s.num_decode_tokens]
    assert len(mixed) >= 5 and all(s.num_prefill_tokens + s.num_decode_tokens <= 5 for s in steps)
    assert harness.is_idle()


def test_preempted_requests_resume_with_the_tokens_they_had_alone(tiny_backbone: TinyBackbone, tmp_path):
    harness = Harness(tiny_backbone, tmp_path / "store", kv_cache_tokens=96, kv_block_size=4)
    alone = {task: token_ids(harness.alone(TEXTS[task], task, max_new_tokens=30)) for task in TASKS}
    assert harness.engine.num_preemptions == 0
    mixed = harness.run(*(harness.request(TEXTS[task], task, max_new_tokens=30) for task in TASKS))
    assert harness.engine.num_preemptions > 0
    assert {task: token_ids(c) for task, c in zip(TASKS, mixed, strict=True)} == alone
    assert harness.is_idle()


def test_rows_of_one_task_hold_its_keys_and_values_once(tiny_backbone: TinyBackbone, tmp_path):
    harness = Harness(tiny_backbone, tmp_path / "store", kv_block_size=4)
    requests = [harness.request(f"row {i}", "prefix_projection", max_new_tokens=4) for i in range(8)]
    for request in requests:
        harness.engine.add(request)
    harness.engine.step()
    (task,) = harness.engine.memory.tasks.values()
    running = [request for request in requests if not request.is_finished]  # a random model may end a row early
    assert task.ref_count == len(running) >= 6
    assert len(task.block_ids) == harness.engine.memory.blocks_for(task.num_tokens)
    own = sum(len(row.block_ids) for request in requests for row in request.rows)
    assert harness.engine.memory.num_free_blocks == harness.engine.memory.num_blocks - len(task.block_ids) - own


def test_padding_block_0_holds_zeros_after_mixed_steps(harness: Harness):
    harness.run(*(harness.request(TEXTS[task], task, max_new_tokens=6) for task in TASKS))
    size = harness.engine.pool.block_size
    assert all(not layer[:size].any() for layer in [*harness.engine.pool.keys, *harness.engine.pool.values])
