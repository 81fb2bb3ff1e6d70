"""vLLM's extensions of the OpenAI routes, through a real port on the demo backbone and its `upper` task: the
tokenizer routes, token-id prompts, echo with logprobs, prompt_logprobs, ignore_eos, min_tokens and prompt_embeds.
Log-probabilities are compared with PEFT's own forward of the same task (no cache, no batch: a third thing)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from peft import PeftModel

from server.api.settings import Settings
from server.demo import DEMO_TASKS
from server.demo.evaluate import load_backbone
from server.demo.tasks import encode_bytes
from server.engine.default_backbone import BOS_ID, EOS_ID
from tests.live_server import live_server

pytestmark = pytest.mark.slow

BACKBONE = "promptserve/default"
PROMPT = "hello world"
PROMPT_IDS = [BOS_ID, *encode_bytes(PROMPT)]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(store_dir=str(tmp_path_factory.mktemp("store")), enable_prompt_embeds=True)
    with live_server(settings) as base:
        yield base


@pytest.fixture(scope="module")
def peft_upper() -> PeftModel:
    return PeftModel.from_pretrained(load_backbone(), DEMO_TASKS["upper"]).eval()


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def complete(url: str, **body: Any) -> dict[str, Any]:
    response = post(url, "/v1/completions", {"model": "upper", "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def reference_logprobs(model: PeftModel, ids: list[int]) -> list[float]:
    """PEFT's log-probability of each token after the ones before it (the task's virtual tokens first)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -len(ids) :]  # [T, V]: the input's positions
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]


def embeds_of(model: PeftModel, ids: list[int]) -> str:
    """The ids' input embeddings, as vLLM takes prompt_embeds: base64 of a torch.save'd [T, H] tensor."""
    with torch.no_grad():
        tensor = model.get_base_model().get_input_embeddings()(torch.tensor(ids)).float()
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


# ---- the tokenizer routes


def test_tokenize_and_detokenize_round_trip(url: str) -> None:
    tokens = post(url, "/tokenize", {"prompt": PROMPT}).json()
    assert tokens["tokens"] == PROMPT_IDS and tokens["count"] == len(PROMPT_IDS)
    assert post(url, "/detokenize", {"tokens": tokens["tokens"][1:]}).json() == {"prompt": PROMPT}


def test_tokenize_without_special_tokens_adds_no_bos(url: str) -> None:
    assert post(url, "/tokenize", {"prompt": PROMPT, "add_special_tokens": False}).json()["tokens"] == PROMPT_IDS[1:]


def test_tokenize_max_model_len_is_what_the_task_virtual_tokens_leave(url: str) -> None:
    bare = post(url, "/tokenize", {"prompt": "x"}).json()["max_model_len"]
    virtual = httpx.get(f"{url}/v1/models/upper").json()["num_virtual_tokens"]
    assert bare == 1024 and virtual > 0
    assert post(url, "/tokenize", {"prompt": "x", "model": "upper"}).json()["max_model_len"] == bare - virtual


def test_tokenize_with_an_unknown_model_is_404(url: str) -> None:
    response = post(url, "/tokenize", {"prompt": "x", "model": "nope"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_tokenizer_info_names_the_special_tokens(url: str) -> None:
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert (info["bos_token"], info["eos_token"], info["pad_token"]) == ("<s>", "</s>", "<pad>")
    assert info["model_max_length"] == 1024 and info["chat_template"] is None


@pytest.mark.parametrize("bad", [9999, 2**40, 2**64 + 1])  # past what the tokenizer's own lookup takes (u32) too
def test_detokenize_of_an_id_outside_the_vocabulary_is_400_naming_it(url: str, bad: int) -> None:
    response = post(url, "/detokenize", {"tokens": [104, bad]})
    assert response.status_code == 400 and f"found token {bad}" in response.json()["error"]["message"]


# ---- token-id prompts


def test_token_id_prompt_answers_as_its_text(url: str) -> None:
    by_ids = complete(url, prompt=PROMPT_IDS, max_tokens=24)
    by_text = complete(url, prompt=PROMPT, max_tokens=24)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"] == PROMPT.upper()
    assert by_ids["usage"]["prompt_tokens"] == len(PROMPT_IDS)


def test_token_id_prompts_in_a_list_answer_each(url: str) -> None:
    answer = complete(url, prompt=[PROMPT_IDS, [BOS_ID, *encode_bytes("abc")]], max_tokens=24)
    assert [c["text"] for c in answer["choices"]] == [PROMPT.upper(), "ABC"]


@pytest.mark.parametrize("bad", [259, 100_000, -1, 2**40, -(2**63) - 1])
def test_token_id_outside_the_vocabulary_is_400_naming_it(url: str, bad: int) -> None:
    response = post(url, "/v1/completions", {"model": "upper", "prompt": [BOS_ID, bad], "max_tokens": 2})
    assert response.status_code == 400
    assert "prompt: expected token ids the model can read" in response.json()["error"]["message"]
    assert f"found token {bad}" in response.json()["error"]["message"]


# ---- the prompt's own log-probabilities


def test_echo_logprobs_are_the_prompt_tokens_logprobs_under_the_task(url: str, peft_upper: PeftModel) -> None:
    answer = complete(url, prompt=PROMPT_IDS, max_tokens=1, echo=True, logprobs=1)
    logprobs = answer["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert len(logprobs["token_logprobs"]) == len(PROMPT_IDS) + 1  # the prompt, then the one new token
    expected = reference_logprobs(peft_upper, PROMPT_IDS)
    assert logprobs["token_logprobs"][1 : len(PROMPT_IDS)] == pytest.approx(expected, abs=1e-4)


def test_echo_top_logprobs_hold_the_most_likely_token(url: str, peft_upper: PeftModel) -> None:
    """lm-evaluation-harness's is_greedy: a token is greedy when its logprob is the top one's."""
    ids = [BOS_ID, *encode_bytes("abc"), BOS_ID, *encode_bytes("ABC"), EOS_ID]  # the task's own answer
    answer = complete(url, prompt=ids, max_tokens=1, echo=True, logprobs=1)
    logprobs = answer["choices"][0]["logprobs"]
    answer_part = range(5, len(ids))  # the answer's tokens, each the task's greedy choice
    assert all(logprobs["token_logprobs"][i] == max(logprobs["top_logprobs"][i].values()) for i in answer_part)
    assert logprobs["token_logprobs"][1] < max(logprobs["top_logprobs"][1].values())  # "a" after <s> is not


def test_echo_with_max_tokens_zero_answers_the_prompt_alone(url: str) -> None:
    answer = complete(url, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    choice = answer["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(PROMPT_IDS)
    assert answer["usage"]["prompt_tokens"] == len(PROMPT_IDS) and answer["usage"]["completion_tokens"] == 0


def test_echo_text_offsets_point_into_the_echoed_text(url: str) -> None:
    """The prompt's <s> shows as a token but not in the text: every token's offset is where its text starts."""
    choice = complete(url, prompt="hi yo", max_tokens=3, echo=True, logprobs=1)["choices"][0]
    text, logprobs = choice["text"], choice["logprobs"]
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and offsets[:6] == [0, 0, 1, 2, 3, 4]
    for token, offset in zip(logprobs["tokens"], offsets, strict=True):
        assert token == "<s>" or text[offset : offset + len(token)] == token


def test_echo_alone_counts_the_tasks_virtual_tokens(url: str) -> None:
    usage = complete(url, prompt="hi yo", max_tokens=0, echo=True, logprobs=1)["usage"]
    assert usage["prompt_tokens_details"]["virtual_tokens"] == 8 and usage["completion_tokens"] == 0


def test_prompt_logprobs_rank_the_prompt_tokens(url: str, peft_upper: PeftModel) -> None:
    answer = complete(url, prompt=PROMPT_IDS, max_tokens=1, prompt_logprobs=2)
    entries = answer["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(PROMPT_IDS)
    expected = reference_logprobs(peft_upper, PROMPT_IDS)
    for position, (token_id, entry) in enumerate(zip(PROMPT_IDS[1:], entries[1:], strict=True)):
        assert entry[str(token_id)]["logprob"] == pytest.approx(expected[position], abs=1e-4)
        best = min(entry.values(), key=lambda e: e["rank"])
        assert best["rank"] == 1 and best["logprob"] >= entry[str(token_id)]["logprob"]


def test_echo_logprobs_on_an_ensemble_is_400(url: str) -> None:
    body = {"model": BACKBONE, "task_ids": ["upper", "reverse"], "prompt": PROMPT, "echo": True, "logprobs": 1}
    response = post(url, "/v1/completions", body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "task_ids"


# ---- how long a completion runs


def test_ignore_eos_returns_exactly_max_tokens(url: str) -> None:
    plain = complete(url, prompt=PROMPT, max_tokens=40)
    ignoring = complete(url, prompt=PROMPT, max_tokens=40, ignore_eos=True)
    assert plain["usage"]["completion_tokens"] < 40  # the task ends its answer by itself
    assert ignoring["usage"]["completion_tokens"] == 40 and ignoring["choices"][0]["finish_reason"] == "length"


def test_min_tokens_holds_off_the_end_of_sequence(url: str) -> None:
    plain = complete(url, prompt=PROMPT, max_tokens=40)["usage"]["completion_tokens"]
    held = complete(url, prompt=PROMPT, max_tokens=40, min_tokens=plain + 5)["usage"]["completion_tokens"]
    assert held >= plain + 5


def test_min_tokens_over_max_tokens_is_400(url: str) -> None:
    response = post(url, "/v1/completions", {"model": "upper", "prompt": "x", "max_tokens": 2, "min_tokens": 3})
    assert response.status_code == 400


# ---- prompt embeddings


def test_prompt_embeds_answer_as_their_token_ids_in_a_mixed_batch(url: str, peft_upper: PeftModel) -> None:
    async def both() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            bodies = [
                {"prompt_embeds": embeds_of(peft_upper, PROMPT_IDS)},
                {"prompt": PROMPT_IDS},
                {"prompt": "something else", "model": "reverse"},
            ]
            responses = await asyncio.gather(*(
                client.post("/v1/completions", json={"model": "upper", "max_tokens": 24, "temperature": 0,
                                                     "logprobs": 0, **body})
                for body in bodies
            ))  # fmt: skip
        return [response.json() for response in responses]

    by_embeds, by_ids, other = asyncio.run(both())
    assert by_embeds["choices"][0]["text"] == by_ids["choices"][0]["text"] == PROMPT.upper()
    assert by_embeds["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
        by_ids["choices"][0]["logprobs"]["token_logprobs"], abs=1e-4
    )
    assert by_embeds["usage"]["prompt_tokens"] == len(PROMPT_IDS)
    assert other["choices"][0]["text"] == "esle gnihtemos"


def test_prompt_embeds_on_the_bare_backbone_continue_as_its_ids(url: str, peft_upper: PeftModel) -> None:
    by_embeds = complete(url, model=BACKBONE, prompt_embeds=embeds_of(peft_upper, PROMPT_IDS), max_tokens=8)
    by_ids = complete(url, model=BACKBONE, prompt=PROMPT_IDS, max_tokens=8)
    assert by_embeds["choices"][0]["text"] == by_ids["choices"][0]["text"]


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_prompt_embeds_pickle_payload_is_400_and_never_runs(url: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    response = post(url, "/v1/completions", {"model": "upper", "prompt_embeds": base64.b64encode(buffer.getvalue())
                                             .decode()})  # fmt: skip
    error = response.json()["error"]
    assert response.status_code == 400 and "refused, not run" in error["message"] and error["param"] == "prompt_embeds"
    assert "weights_only` set to `False`" not in error["message"]  # torch's advice is not the client's to follow
    assert not marker.exists()


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (torch.full((3, 128), float("nan")), "finite"),
        (torch.zeros(3, 64), "shape"),
        (torch.zeros(3, 128, dtype=torch.int32), "float32"),
    ],
)
def test_prompt_embeds_that_do_not_fit_the_backbone_are_400(url: str, tensor: torch.Tensor, expected: str) -> None:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    body = {"model": "upper", "prompt_embeds": base64.b64encode(buffer.getvalue()).decode()}
    response = post(url, "/v1/completions", body)
    assert response.status_code == 400 and expected in response.json()["error"]["message"]


def test_prompt_embeds_not_base64_is_400(url: str) -> None:
    response = post(url, "/v1/completions", {"model": "upper", "prompt_embeds": "not base64!"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt_embeds"


def test_errors_name_the_field_at_fault(url: str) -> None:
    bad_id = post(url, "/v1/completions", {"model": "upper", "prompt": [[999999]], "max_tokens": 2}).json()["error"]
    too_few = post(url, "/v1/completions", {"model": "upper", "prompt": "a", "max_tokens": 2, "min_tokens": 5})
    assert bad_id["param"] == "prompt" and too_few.json()["error"]["param"] == "min_tokens"


def test_max_tokens_past_the_positions_is_context_length_exceeded(url: str) -> None:
    """As OpenAI and vLLM answer: 8 virtual + 1011 prompt tokens leave 5 of the demo backbone's 1024 positions."""
    body = {"model": "upper", "prompt": "a" * 1010, "temperature": 0}
    refused = post(url, "/v1/completions", {**body, "max_tokens": 100}).json()["error"]
    assert refused["code"] == "context_length_exceeded" and refused["param"] == "prompt"
    assert refused["message"] == (
        "expected at most 5 new tokens, what the backbone's 1024 positions leave after the 1011 input tokens and 8 "
        "virtual tokens; found max_tokens 100"
    )
    assert complete(url, **body, max_tokens=5)["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("echo", [False, True])  # lm-eval's loglikelihood requests echo; its generations do not
def test_a_prompt_of_several_past_the_positions_is_refused_naming_it(url: str, echo: bool) -> None:
    """lm-eval sends --batch_size prompts in one request: the refusal says which, what fits and what came (upper's 8
    virtual tokens and one new token leave 1015 of the 1024 positions; scored alone, 1016)."""
    scoring = {"echo": True, "logprobs": 1} if echo else {}
    body = {"model": "upper", "prompt": [PROMPT_IDS, [BOS_ID] + [97] * 1099], "max_tokens": 1, **scoring}
    refused = post(url, "/v1/completions", body).json()["error"]
    assert refused["code"] == "context_length_exceeded" and refused["param"] == "prompt"
    assert refused["message"] in (
        "prompt[1]: expected at most 1015 input tokens (the backbone's 1024 positions less 8 virtual tokens and 1 "
        "new token); found 1100",
        *(["prompt[1]: expected at most 1016 tokens (the backbone's 1024 positions less 8 virtual tokens); found 1100"]
          if echo else []),
    )  # fmt: skip
