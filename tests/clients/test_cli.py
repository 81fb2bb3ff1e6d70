"""The client CLI, run in process against the app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from promptserve_client import Client
from promptserve_client.cli import main
from tests.api.fake_engine import FakeEngine, answer_of
from tests.clients.canned_server import TASK_RECORD, CannedServer


def run(client: Client, *argv: str) -> int:
    return main(list(argv), client=client)


def test_cli_tasks_add_prints_version(client: Client, adapter_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(client, "tasks", "add", "new", str(adapter_dir)) == 0
    assert "registered new version 1 (p_tuning, 6 virtual tokens" in capsys.readouterr().out


def test_cli_tasks_ls_table(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(client, "tasks", "ls") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["TASK_ID", "VERSION", "METHOD"]
    assert [line.split()[0] for line in lines[1:]] == ["a", "b"]


def test_cli_tasks_ls_shows_each_task_type(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(client, "tasks", "ls") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[3] == "TASK_TYPE" and lines[1].split()[3] == "CAUSAL_LM"


def test_cli_tasks_ls_and_add_show_a_lora_tasks_rank(
    canned_client: Client, canned: CannedServer, adapter_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lora = {**TASK_RECORD, "task_id": "summarise", "method": "lora", "num_virtual_tokens": 0, "rank": 16}
    canned.answer({"tasks": [lora, TASK_RECORD]})
    assert run(canned_client, "tasks", "ls") == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert (lines[0][5], lines[1][5], lines[2][5]) == ("RANK", "16", "-")
    canned.answer(lora, status=201)
    assert run(canned_client, "tasks", "add", "summarise", str(adapter_dir)) == 0
    assert "registered summarise version 1 (lora rank 16, " in capsys.readouterr().out


def test_cli_tasks_ls_json(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(client, "tasks", "ls", "--json") == 0
    assert [record["task_id"] for record in json.loads(capsys.readouterr().out)] == ["a", "b"]


def test_cli_tasks_rm(client: Client, engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(client, "tasks", "rm", "a") == 0
    assert "a" not in engine.tasks


def test_cli_generate_prints_text(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(client, "generate", "hello", "--task", "a") == 0
    assert capsys.readouterr().out == answer_of("a", "hello") + "\n"


def test_cli_generate_stream_prints_tokens(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(client, "generate", "hello", "--task", "a", "--stream", "--max-new-tokens", "3") == 0
    assert capsys.readouterr().out == "a:o\n"


def test_cli_generate_ensemble_with_details(
    client: Client, engine: FakeEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(client, "generate", "hi", "--tasks", "a,b", "--ensemble", "mean", "--details") == 0
    out = capsys.readouterr().out
    text, _, details = out.partition("\n")
    assert text == answer_of("a", "hi")
    assert [m["task_id"] for m in json.loads(details)["members"]] == ["a", "b"]
    assert engine.requests[-1].task_ids == ("a", "b")


def test_cli_generate_passes_sampling_flags(client: Client, engine: FakeEngine) -> None:
    run(client, "generate", "x", "--do-sample", "--temperature", "0.5", "--seed", "3", "--stop", "\n")
    sampling = engine.requests[-1].sampling
    assert (sampling.do_sample, sampling.temperature, sampling.seed, sampling.stop) == (True, 0.5, 3, ("\n",))


def test_cli_error_exit_1_with_message(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(client, "generate", "x", "--task", "nope") == 1
    assert capsys.readouterr().err == "error (not_found): task 'nope' is not registered\n"


def test_cli_health_and_info(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(client, "health") == 0
    assert run(client, "info") == 0
    out = capsys.readouterr().out
    assert out.startswith("ok\n") and json.loads(out[3:])["model_id"] == "fake/tiny"


def test_cli_unreachable_server_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--url", "http://127.0.0.1:9", "--timeout", "2"]) == 1
    assert "no answer from http://127.0.0.1:9" in capsys.readouterr().err


def test_cli_url_from_env(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PROMPTSERVE_URL", "http://127.0.0.1:9")
    assert main(["health", "--timeout", "2"]) == 1
    assert "http://127.0.0.1:9" in capsys.readouterr().err


# ---- classify, score and label names, against a stand-in server (the app's routes land separately)

TOKEN_PREDICTION = [
    {"token": "Ada", "start": 0, "end": 3, "label": "B-PER", "score": 0.9},
    {"token": "runs", "start": 4, "end": 8, "label": "O", "score": 0.625},
]
SCORES = {
    "scores": [
        {"candidate": "no", "logprob": -3.0, "mean_logprob": -3.0, "num_tokens": 1},
        {"candidate": "yes please", "logprob": -0.5, "mean_logprob": -0.25, "num_tokens": 2},
    ],
    "best": "yes please",
}


def test_cli_classify_prints_a_line_per_input(
    canned_client: Client, canned: CannedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    canned.answer({"predictions": [[{"label": "pos", "score": 0.75}, {"label": "neg", "score": 0.25}], []]})
    assert run(canned_client, "classify", "good", "bad", "--task", "sentiment") == 0
    assert capsys.readouterr().out == "pos 0.7500  neg 0.2500\n\n"
    assert canned.last_body == {"inputs": ["good", "bad"], "task_id": "sentiment", "parameters": {"top_k": None}}


def test_cli_classify_prints_token_labels(
    canned_client: Client, canned: CannedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    canned.answer({"predictions": [TOKEN_PREDICTION]})
    assert run(canned_client, "classify", "Ada runs", "--task", "ner") == 0
    assert capsys.readouterr().out == "Ada/B-PER 0.9000  runs/O 0.6250\n"


def test_cli_classify_ensemble_and_top_k_in_body(canned_client: Client, canned: CannedServer) -> None:
    canned.answer({"predictions": [[]]})
    assert run(canned_client, "classify", "x", "--tasks", "a, b", "--ensemble", "mean", "--top-k", "1") == 0
    assert canned.last_body == {
        "inputs": ["x"],
        "task_id": None,
        "task_ids": ["a", "b"],
        "ensemble": "mean",
        "parameters": {"top_k": 1},
    }


def test_cli_classify_json_prints_response(
    canned_client: Client, canned: CannedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    canned.answer({"predictions": [TOKEN_PREDICTION]})
    assert run(canned_client, "classify", "Ada runs", "--task", "ner", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"predictions": [TOKEN_PREDICTION]}


def test_cli_classify_error_exit_1_with_message(
    canned_client: Client, canned: CannedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    canned.answer({"error": "task_id: expected a SEQ_CLS or TOKEN_CLS task", "error_type": "validation"}, status=400)
    assert run(canned_client, "classify", "x", "--task", "chat") == 1
    assert capsys.readouterr().err == "error (validation): task_id: expected a SEQ_CLS or TOKEN_CLS task\n"


def test_cli_score_marks_best(canned_client: Client, canned: CannedServer, capsys: pytest.CaptureFixture[str]) -> None:
    canned.answer(SCORES)
    assert run(canned_client, "score", "q", "--candidate", "no", "--candidate", "yes please", "--task", "qa") == 0
    assert capsys.readouterr().out.splitlines() == [
        "  no          logprob -3.0000  mean -3.0000  (1 tokens)",
        "* yes please  logprob -0.5000  mean -0.2500  (2 tokens)",
    ]
    assert canned.last_body == {"inputs": "q", "candidates": ["no", "yes please"], "task_id": "qa"}


def test_cli_score_comma_separated_candidates_and_ensemble(canned_client: Client, canned: CannedServer) -> None:
    canned.answer(SCORES)
    assert run(canned_client, "score", "q", "--candidates", "no,yes please", "--tasks", "a,b") == 0
    assert canned.last_body == {
        "inputs": "q",
        "candidates": ["no", "yes please"],
        "task_id": None,
        "task_ids": ["a", "b"],
    }


def test_cli_score_json_prints_response(
    canned_client: Client, canned: CannedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    canned.answer(SCORES)
    assert run(canned_client, "score", "q", "--candidates", "no,yes please", "--json") == 0
    assert json.loads(capsys.readouterr().out) == SCORES


def test_cli_score_usage_error_without_candidates(canned_client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        run(canned_client, "score", "q", "--task", "qa")
    assert exit_.value.code == 2 and "--candidate" in capsys.readouterr().err


def test_cli_tasks_add_labels_sent_and_printed(
    canned_client: Client, canned: CannedServer, adapter_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    canned.answer({**TASK_RECORD, "labels": ["neg", "pos"]}, status=201)
    assert run(canned_client, "tasks", "add", "sentiment", str(adapter_dir), "--labels", "neg, pos") == 0
    assert json.loads(canned.last_parts["labels"].content) == ["neg", "pos"]
    assert capsys.readouterr().out.splitlines()[-1] == "labels: neg, pos"


def test_cli_tasks_add_malformed_id2label_exit_1(
    canned_client: Client, canned: CannedServer, adapter_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (adapter_dir / "config.json").write_text(json.dumps({"id2label": {"0": "neg", "0x1": "pos"}}))
    assert run(canned_client, "tasks", "add", "sentiment", str(adapter_dir)) == 1
    assert "id2label: expected the ids ['0', '1'] (0..N-1, each once); found ['0', '0x1']" in capsys.readouterr().err
    assert canned.requests == []
