"""lm-evaluation-harness evaluates a served task as it evaluates a vLLM server: `lm_eval --model local-completions`
with its defaults (the remote tokenizer found through /tokenizer_info and /tokenize) against a real server on a
real port, offline, on tasks written as local YAML over local JSON data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.api.settings import Settings
from server.demo.evaluate import held_out_inputs
from server.demo.tasks import TRANSFORMATIONS
from tests.live_server import live_server
from tests.seq2seq_fixtures import build_tiny_seq2seq_backbone

pytestmark = pytest.mark.slow

NUM_DOCS = 16  # a tiny limit: the point is the protocol, and the demo task is 99% exact
GENERATE_TASK = """
task: promptserve_upper_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "<s>{{{{input}}}}"
doc_to_target: "{{{{output}}}}"
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: 48
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

OPENAI_PAGE = Path(__file__).resolve().parents[2] / "docs" / "openai.md"


def documented_choice_task(data: Path) -> str:
    """The multiple_choice task docs/openai.md shows, over the test's data: the page's YAML is the one that runs."""
    page = OPENAI_PAGE.read_text()
    block = page[page.index("```yaml\n", page.index("## Evaluation harnesses")) + len("```yaml\n") :]
    return block[: block.index("```")].replace("test: upper.json", f"test: {data}")


def upper_docs() -> list[dict[str, object]]:
    """Held-out inputs (the demo task never trained on them) whose four transformations all differ."""
    docs = []
    for text in held_out_inputs(200):
        answers = [TRANSFORMATIONS[name].apply(text) for name in ("upper", "echo", "reverse", "json")]
        if len(set(answers)) == len(answers):
            docs.append({"input": text, "output": answers[0], "choices": [a + "</s>" for a in answers], "label": 0})
    return docs[:NUM_DOCS]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lm_eval_tasks")
    data = directory / "upper.json"
    data.write_text(json.dumps(upper_docs()))
    (directory / "upper_generate.yaml").write_text(GENERATE_TASK.format(data=data))
    (directory / "upper_choice.yaml").write_text(documented_choice_task(data))
    return directory


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with live_server(Settings(store_dir=str(tmp_path_factory.mktemp("store")))) as url:
        yield url


def run_lm_eval(
    url: str, tasks_dir: Path, out: Path, tasks: str, model: str = "upper", *extra: str
) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, offline: the Hub and datasets' downloads are off."""
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env = {**os.environ, **offline, "HF_DATASETS_CACHE": str(out / "datasets")}
    command = [
        sys.executable, "-m", "lm_eval", "--model", "local-completions",
        "--model_args", f"model={model},base_url={url}/v1/completions",
        "--tasks", tasks, "--include_path", str(tasks_dir), "--output_path", str(out / "results"), *extra,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)


def scores(out: Path) -> dict[str, dict[str, float]]:
    [path] = (out / "results").rglob("results_*.json")
    return json.loads(path.read_text())["results"]


def test_lm_eval_scores_the_upper_task_on_generation_and_multiple_choice(
    demo_url: str, tasks_dir: Path, tmp_path: Path
) -> None:
    done = run_lm_eval(demo_url, tasks_dir, tmp_path, "promptserve_upper_generate,promptserve_upper_choice")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Using remote tokenizer" in done.stderr  # detected through /tokenizer_info and /tokenize, no Hub
    results = scores(tmp_path)
    assert results["promptserve_upper_generate"]["exact_match,none"] >= 0.9
    assert results["promptserve_upper_choice"]["acc,none"] >= 0.9


def test_lm_eval_scores_the_bare_backbone_below_the_task(demo_url: str, tasks_dir: Path, tmp_path: Path) -> None:
    """The same run on the bare backbone (it echoes its input): the scores above are the task's, not the harness's."""
    done = run_lm_eval(demo_url, tasks_dir, tmp_path, "promptserve_upper_choice", model="promptserve/default")
    assert done.returncode == 0, done.stderr[-3000:]
    assert scores(tmp_path)["promptserve_upper_choice"]["acc,none"] < 0.5


# ---- an encoder-decoder backbone: generation makes sense, a prompt's log-probabilities do not


@pytest.fixture(scope="module")
def t5_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    t5 = build_tiny_seq2seq_backbone("t5", tmp_path_factory.mktemp("lm-eval-t5"))
    settings = Settings(model=str(t5.path), store_dir=str(tmp_path_factory.mktemp("t5-store")), demo_tasks=False,
                        poll_interval_s=0, log_level="critical")  # fmt: skip
    adapter = t5.adapters["prompt_tuning"]
    files = {name: (adapter / f"{name}{ext}").read_bytes() for name, ext in
             (("adapter_config", ".json"), ("adapter_model", ".safetensors"))}  # fmt: skip
    with live_server(settings) as url:
        httpx.put(f"{url}/v1/tasks/s2s", files=files, timeout=60).raise_for_status()
        yield url


def test_lm_eval_generates_on_an_encoder_decoder_as_the_server_answers(
    t5_url: str, tasks_dir: Path, tmp_path: Path
) -> None:
    """A random tiny T5 has no score worth asserting: lm-eval's answers must be the server's own for its prompts."""
    done = run_lm_eval(
        t5_url, tasks_dir, tmp_path, "promptserve_upper_generate", "s2s", "--limit", "4", "--log_samples"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [samples] = (tmp_path / "results").rglob("samples_promptserve_upper_generate_*.jsonl")
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(lines) == 4
    for sample in lines:
        context = sample["arguments"]["gen_args_0"]["arg_0"]
        ids = httpx.post(f"{t5_url}/tokenize", json={"prompt": context, "add_special_tokens": False}).json()["tokens"]
        body = {"model": "s2s", "prompt": ids, "max_tokens": 48, "temperature": 0, "stop": ["</s>"]}
        answer = httpx.post(f"{t5_url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert sample["resps"][0][0] == answer
    assert any(sample["resps"][0][0] for sample in lines)  # the task says something: the comparison has content


def test_lm_eval_loglikelihood_on_an_encoder_decoder_is_a_clear_400(
    t5_url: str, tasks_dir: Path, tmp_path: Path
) -> None:
    done = run_lm_eval(t5_url, tasks_dir, tmp_path, "promptserve_upper_choice", "s2s", "--limit", "1")
    assert done.returncode != 0
    assert "expected a causal backbone for prompt log-probabilities" in done.stderr
