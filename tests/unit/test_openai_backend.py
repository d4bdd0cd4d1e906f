"""engine.backends.openai and the job fields of model.backend openai: validation, the key from the environment, the
response_format sent, token usage, failures as rows (against a real local HTTP server that fails on purpose, and a
port where nothing listens), and token cost in report.json."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from openai.types.chat import ChatCompletion
from typer.testing import CliRunner

from engine.backends import SERVER_UNAVAILABLE, Request
from engine.backends.openai import (NO_KEY, OpenAIBackend, check_server, generation_from, read_api_key,
                                    response_format)
from engine.cli import app
from engine.errors import BackendError, JobError
from engine.job import JobSpec, load_job
from engine.plan import make_plan
from engine.reporting.report import token_cost
from engine.stages.parse import parse_one

ROOT = Path(__file__).resolve().parents[2]
APIXABAN = ROOT / "jobs" / "apixaban.yaml"
JOB = load_job(APIXABAN)
OPENAI_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # what the OpenAI API accepts as a json_schema name


def openai_job(**model) -> JobSpec:
    data = JOB.model_dump()
    data["model"].update({"backend": "openai", "name": "served-model", "base_url": "http://127.0.0.1:8000/v1", **model})
    return JobSpec.model_validate(data)


def write_job(tmp_path: Path, model: dict) -> Path:
    data = yaml.safe_load(APIXABAN.read_text(encoding="utf-8"))
    data["model"].update(model)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# --- the job's fields ------------------------------------------------------------------------------------------------
def test_the_server_fields_have_their_defaults():
    model = openai_job().model
    assert (model.api_key_env, model.max_concurrency, model.timeout_s, model.max_retries) == ("OPENAI_API_KEY", 16, 120.0, 6)
    assert openai_job(base_url="http://vllm.internal:8000/v1/").model.base_url == "http://vllm.internal:8000/v1"


@pytest.mark.parametrize("url", ["127.0.0.1:8000/v1", "localhost", "ftp://host/v1", "http:///v1"])
def test_a_bad_base_url_names_the_field_and_line(tmp_path, url):
    with pytest.raises(JobError) as caught:
        load_job(write_job(tmp_path, {"backend": "openai", "base_url": url}))
    problem = " ".join(caught.value.problems)
    assert re.search(r"model\.base_url \(line \d+\): .*not an http\(s\) URL.*http://127\.0\.0\.1:8000/v1", problem), problem


def test_backend_openai_needs_a_base_url_and_serves_no_adapter_itself(tmp_path):
    with pytest.raises(JobError, match=r"model \(line \d+\): model.backend openai needs base_url"):
        load_job(write_job(tmp_path, {"backend": "openai"}))
    with pytest.raises(JobError, match="--lora-modules"):
        load_job(write_job(tmp_path, {"backend": "openai", "base_url": "http://127.0.0.1:8000/v1", "adapter": "out/adapter"}))


def test_api_key_env_is_a_variable_name_never_the_key(tmp_path):
    with pytest.raises(JobError, match=r"model\.api_key_env \(line \d+\): .*NAME of an environment variable"):
        load_job(write_job(tmp_path, {"backend": "openai", "base_url": "http://127.0.0.1:8000/v1", "api_key_env": "sk-proj-abc123"}))
    assert load_job(write_job(tmp_path, {"backend": "openai", "base_url": "http://h:1/v1", "api_key_env": None})).model.api_key_env is None


def test_the_key_comes_from_the_named_variable(monkeypatch):
    monkeypatch.setenv("SCREEN_KEY", "secret-value")
    assert read_api_key(openai_job(api_key_env="SCREEN_KEY").model) == "secret-value"
    assert read_api_key(openai_job(api_key_env=None).model) == NO_KEY
    for value in (None, "  "):
        if value is None:
            monkeypatch.delenv("SCREEN_KEY")
        else:
            monkeypatch.setenv("SCREEN_KEY", value)
        with pytest.raises(BackendError, match="SCREEN_KEY, which is not set.*export SCREEN_KEY=.*api_key_env: null"):
            read_api_key(openai_job(api_key_env="SCREEN_KEY").model)


def test_a_run_without_the_key_stops_in_one_line_before_ray(tmp_path, monkeypatch):
    import ray

    monkeypatch.delenv("ENGINE_TEST_MISSING_KEY", raising=False)
    path = write_job(tmp_path, {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "name": "served-model",
                                "api_key_env": "ENGINE_TEST_MISSING_KEY"})
    ray_was_up = ray.is_initialized()  # another test of the session may have started Ray in this process
    result = CliRunner().invoke(app, ["run", str(path), "--output", str(tmp_path / "out")], env={"COLUMNS": "400"})
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: model.api_key_env names ENGINE_TEST_MISSING_KEY, which is not set")
    assert ray.is_initialized() == ray_was_up and not (tmp_path / "out").exists()


def test_where_and_how_the_server_is_asked_is_not_in_the_fingerprint():
    base = openai_job().fingerprint()
    moved = openai_job(base_url="https://api.example.com/v1", api_key_env=None, max_concurrency=64, timeout_s=5, max_retries=0)
    assert moved.fingerprint() == base
    data = openai_job().model_dump()
    data["pricing"].update(usd_per_million_prompt_tokens=3.0, usd_per_million_completion_tokens=15.0)
    assert JobSpec.model_validate(data).fingerprint() == base
    assert openai_job(name="another-model").fingerprint() != base
    assert openai_job().fingerprint() != JOB.fingerprint()  # another backend is another run


# --- what is sent --------------------------------------------------------------------------------------------------
def _objects(node):
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value)


def test_response_format_is_each_questions_schema_strict():
    plan = make_plan(openai_job())
    assert {q.spec.type for q in plan.questions} >= {"yes_no", "numeric", "date"}
    for question in plan.questions:
        sent = response_format(question)
        assert sent["type"] == "json_schema" and set(sent["json_schema"]) == {"name", "schema", "strict"}
        assert sent["json_schema"]["strict"] is True and OPENAI_NAME.match(sent["json_schema"]["name"])
        assert sent["json_schema"]["schema"] == question.json_schema
        for node in _objects(sent["json_schema"]["schema"]):  # what strict structured outputs require of a schema
            assert node["additionalProperties"] is False and set(node["required"]) == set(node["properties"])
        json.dumps(sent)  # plain JSON, as it goes over the wire


# --- what comes back --------------------------------------------------------------------------------------------------
def completion(content: str | None, finish: str = "stop", usage: dict | None = None, refusal: str | None = None) -> ChatCompletion:
    return ChatCompletion.model_validate({
        "id": "c1", "object": "chat.completion", "created": 0, "model": "served-model",
        "choices": [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": content, "refusal": refusal}}],
        "usage": usage})


def test_usage_becomes_the_rows_token_counts():
    usage = {"prompt_tokens": 1157, "completion_tokens": 44, "total_tokens": 1201, "prompt_tokens_details": {"cached_tokens": 1152}}
    g = generation_from(completion('{"evidence": "", "answer": "no"}', usage=usage), truncated=True)
    assert (g.text, g.finish_reason, g.prompt_tokens, g.cached_tokens, g.completion_tokens, g.truncated, g.error) == \
        ('{"evidence": "", "answer": "no"}', "stop", 1157, 1152, 44, True, None)
    no_details = generation_from(completion("{}", usage={"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}), False)
    assert (no_details.prompt_tokens, no_details.cached_tokens, no_details.completion_tokens) == (10, 0, 2)
    no_usage = generation_from(completion("{}"), False)
    assert (no_usage.prompt_tokens, no_usage.cached_tokens, no_usage.completion_tokens) == (None, None, None)


def test_a_refusal_and_a_cut_answer_are_error_rows():
    refused = generation_from(completion(None, refusal="I can't help with that."), False)
    assert refused.text is None and refused.error == "the model refused: I can't help with that."
    plan = make_plan(openai_job())
    cut = generation_from(completion('{"evidence": "AF', finish="length"), False)
    row = parse_one(plan, "atrial_fibrillation", cut.error, cut.finish_reason, cut.text)
    assert row["status"] == "error" and "reached model.max_tokens" in row["error"]


# --- failures, against a real HTTP server ------------------------------------------------------------------------------
class FailingServer:
    """A local HTTP server answering every POST with `status` (and /v1/models with `models`), counting the POSTs."""

    def __init__(self, status: int, models: list[str] | None = None, models_status: int = 200):
        self.status, self.models, self.models_status, self.posts = status, models or [], models_status, 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802 - http.server's name
                owner.posts += 1
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._reply(owner.status, {"error": {"message": f"failing on purpose ({owner.status})"}})

            def do_GET(self):  # noqa: N802
                body = {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "t"} for m in owner.models]}
                self._reply(owner.models_status, body if owner.models_status == 200 else {"error": {"message": "bad key"}})

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def failing():
    servers = []

    def start(status: int, **kwargs) -> FailingServer:
        servers.append(FailingServer(status, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def ask(base_url: str, retries: int, questions: int = 2):
    job = openai_job(base_url=base_url, api_key_env=None, max_retries=retries, timeout_s=5)
    plan = make_plan(job)
    backend = OpenAIBackend(plan)
    try:
        return backend.generate([Request("n1", "AF on warfarin.", q) for q in plan.questions[:questions]])
    finally:
        backend.close()


def test_a_server_error_is_retried_then_an_error_row_a_rerun_asks_again(failing):
    server = failing(503)
    generations = ask(server.base_url, retries=1)
    assert server.posts == 2 * 2  # each request once and once more
    for g in generations:
        assert g.text is None and g.prompt_tokens is None and g.completion_tokens is None
        assert g.error.startswith(f"{SERVER_UNAVAILABLE}: {server.base_url} HTTP 503 after 1 retries (failing on purpose (503))")


def test_a_refused_request_is_not_retried_and_not_asked_again(failing):
    server = failing(400)
    generations = ask(server.base_url, retries=3)
    assert server.posts == 2
    assert all(g.error == "model server refused the request: HTTP 400 (failing on purpose (400))" for g in generations)


def test_nothing_listening_is_a_connection_failure_row():
    from vllm_server import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    [generation] = ask(url, retries=0, questions=1)
    assert generation.error.startswith(f"{SERVER_UNAVAILABLE}: {url} connection failed after 0 retries")


def test_the_start_up_check_names_what_to_fix(failing, monkeypatch):
    with pytest.raises(BackendError, match=r"does not serve 'served-model' \(it serves: other-model\).*--served-model-name"):
        check_server(openai_job(base_url=failing(200, models=["other-model"]).base_url, api_key_env=None))
    check_server(openai_job(base_url=failing(200, models=["served-model"]).base_url, api_key_env=None))
    monkeypatch.setenv("OPENAI_API_KEY", "a-wrong-key")
    with pytest.raises(BackendError, match="refused the key in OPENAI_API_KEY: bad key"):
        check_server(openai_job(base_url=failing(200, models_status=401).base_url))
    from vllm_server import free_port

    with pytest.raises(BackendError, match="cannot be reached.*start it .*or fix model.base_url"):
        check_server(openai_job(base_url=f"http://127.0.0.1:{free_port()}/v1", api_key_env=None, max_retries=0))


# --- cost ------------------------------------------------------------------------------------------------------------
def test_token_cost_by_hand():
    pricing = openai_job().pricing.model_copy(update={"usd_per_million_prompt_tokens": 0.15,
                                                       "usd_per_million_cached_prompt_tokens": 0.075,
                                                       "usd_per_million_completion_tokens": 0.60})
    # 1,000,000 prompt of which 800,000 cached, 100,000 completion: 0.2 x 0.15 + 0.8 x 0.075 + 0.1 x 0.60
    assert token_cost(pricing, 1_000_000, 800_000, 100_000) == pytest.approx(0.03 + 0.06 + 0.06)
    same_price = pricing.model_copy(update={"usd_per_million_cached_prompt_tokens": None})
    assert token_cost(same_price, 1_000_000, 800_000, 0) == pytest.approx(0.15)


def test_report_prices_an_openai_run_by_its_tokens_and_counts_unavailable_rows(tmp_path, capsys):
    from report_fixtures import gold_answers, write_output_folder

    data = openai_job().model_dump()
    data["pricing"].update(usd_per_million_prompt_tokens=2.0, usd_per_million_cached_prompt_tokens=0.5,
                           usd_per_million_completion_tokens=8.0)
    job = JobSpec.model_validate(data)
    rows = gold_answers(job, notes=6).to_pylist()
    for row in rows[:7]:  # the server was down for these: no answer, no tokens
        row.update(status="error", value_bool=None, value_num=None, unit=None, evidence=None, grounding=None, verified=None,
                   error=f"{SERVER_UNAVAILABLE}: http://127.0.0.1:8000/v1 connection failed after 6 retries (Connection error.)",
                   prompt_tokens=None, cached_tokens=None, completion_tokens=None)
    answers = pa.Table.from_pylist(rows, schema=gold_answers(job, notes=6).schema)
    _, report, _ = write_output_folder(tmp_path / "out", job, answers)
    priced = len(rows) - 7  # each fixture row: 1000 prompt tokens, 900 of them cached, 12 completion
    usd = (priced * 100 * 2.0 + priced * 900 * 0.5 + priced * 12 * 8.0) / 1_000_000
    assert report["server_unavailable_rows"] == 7 and report["rows_by_status"]["error"] == 7
    assert report["cost_basis"] == "tokens" and report["token_cost_usd"] == round(usd, 6)
    assert report["cost_per_10k_patients_usd"] == round(usd / report["patients"] * 10_000, 4)
    assert report["token_prices_usd_per_million"] == {"prompt": 2.0, "cached_prompt": 0.5, "completion": 8.0}
    assert report["cost_method"].startswith(f"tokens: ({priced * 100:,} computed prompt x $2.0/M + {priced * 900:,} cached")
    assert report["model_outputs"] == priced and report["schema_valid_rate"] == 1.0  # a request never answered is no output
    assert report["this_run"]["shards_redone"] == 0 and report["this_run"]["pairs_redone"] == 0
    from engine.cli import print_summary

    print_summary(report, str(tmp_path / "out"))
    printed = " ".join(capsys.readouterr().out.split())
    assert "from tokens" in printed
    assert "Warning: 7 (note, question) pairs met the model server unavailable" in printed and "only those pairs are asked again" in printed


def test_other_backends_keep_the_hardware_hour_cost(tmp_path):
    from report_fixtures import gold_answers, write_output_folder

    _, report, _ = write_output_folder(tmp_path / "out", JOB, gold_answers(JOB, notes=4))
    assert report["cost_basis"] == "gpu_hours" and report["token_cost_usd"] is None
    assert report["cost_method"].startswith("processing_seconds") and report["server_unavailable_rows"] == 0


def test_a_batch_smaller_than_max_concurrency_is_warned_of():
    from engine.cli import batching_warnings

    assert batching_warnings(openai_job()) == []  # 8 notes x 25 questions >= 16
    job = openai_job(max_concurrency=256)
    (warning,) = batching_warnings(job)
    assert "fewer than model.max_concurrency 256: raise notes_per_batch to 11" in warning
