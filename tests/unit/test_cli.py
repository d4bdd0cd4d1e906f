"""engine.cli: every command has help and is documented; validate passes the real job and reports problems as
`Error:` lines without a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from engine.cli import app

ROOT = Path(__file__).resolve().parents[2]
APIXABAN = ROOT / "jobs" / "apixaban.yaml"
README = ROOT / "README.md"
COMMANDS = sorted(typer.main.get_command(app).commands)
PIPE_WIDTH = 80  # rich's width when output is not a terminal (a pipe, a CI log)
WIDE = 10_000  # wide enough that no line wraps: checks what is printed, not how rich wraps it


def invoke(*args: str, columns: int = WIDE):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": str(columns)})


def line_of(source: str, text: str) -> int:
    return next(i + 1 for i, line in enumerate(source.splitlines()) if text in line)


def test_the_app_has_the_documented_commands():
    assert {"run", "validate", "rules"} <= set(COMMANDS)


def test_top_level_help():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and command in result.output
    help_text = typer.main.get_command(app).commands[command].help
    assert help_text and len(help_text.strip()) > 20


def test_every_command_appears_in_the_readme():
    assert README.exists(), "README.md is missing: every CLI command must be documented there"
    text = README.read_text(encoding="utf-8")
    missing = [c for c in COMMANDS if not re.search(rf"python -m engine {re.escape(c)}\b", text)]
    assert missing == [], f"commands not documented in README.md: {missing}"


def test_validate_the_real_job():
    result = invoke("validate", str(APIXABAN))
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK: ")
    assert "25 questions" in result.output and "11 criteria" in result.output


def write_job(folder: Path, source: str) -> str:
    (folder / "bad.yaml").write_text(source, encoding="utf-8")
    return "bad.yaml"


def assert_user_error(result) -> list[str]:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert lines and lines[0].startswith("Error: ")
    assert result.stdout == ""
    return lines


def test_validate_a_job_with_one_problem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = APIXABAN.read_text().replace("    type: yes_no\n", "    type: maybe\n", 1)
    result = invoke("validate", write_job(tmp_path, source))
    lines = assert_user_error(result)
    line = line_of(source, "type: maybe")
    assert lines == [f"Error: bad.yaml: questions[0].type (line {line}): Input should be 'yes_no', 'numeric', 'date' or 'categorical'"]


def test_validate_a_job_with_several_problems_prints_one_line_each(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = APIXABAN.read_text().replace("    type: yes_no\n", "    type: maybe\n", 1)
    source = source.replace("  max_tokens: 96\n", "  max_tokens: 4\n", 1)
    lines = assert_user_error(invoke("validate", write_job(tmp_path, source)))
    assert lines[0] == "Error: bad.yaml: 2 problems"
    assert sorted(line.strip() for line in lines[1:]) == [
        f"model.max_tokens (line {line_of(source, 'max_tokens: 4')}): Input should be greater than or equal to 8",
        f"questions[0].type (line {line_of(source, 'type: maybe')}): Input should be 'yes_no', 'numeric', 'date' or 'categorical'",
    ]


def test_validate_a_rule_problem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = APIXABAN.read_text().replace('rule: "creatinine_max > 2.5"', 'rule: "creatinine_maximum > 2.5"', 1)
    lines = assert_user_error(invoke("validate", write_job(tmp_path, source)))
    assert "creatinine_maximum" in " ".join(lines)


def test_validate_invalid_yaml_and_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = assert_user_error(invoke("validate", write_job(tmp_path, "name: x\ninput: [unclosed\n")))
    assert re.match(r"Error: bad\.yaml: line \d+: not valid YAML", lines[0])
    lines = assert_user_error(invoke("validate", "nope.yaml"))
    assert lines[0].startswith("Error: nope.yaml: cannot read the job file")


def test_a_long_problem_stays_on_one_line(tmp_path):
    source = APIXABAN.read_text().replace("  max_tokens: 96\n", "  max_tokens: 96\n  temperature: 0.5\n", 1)
    path = tmp_path / "job-with-an-unknown-key.yaml"
    path.write_text(source, encoding="utf-8")
    lines = assert_user_error(invoke("validate", str(path), columns=PIPE_WIDTH))
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Error: {path}: model.temperature (line {line_of(source, 'temperature')}): unknown key")
    assert lines[0].endswith("seed, adapter, max_lora_rank, base_url, api_key_env, max_concurrency, timeout_s, max_retries)")


def test_run_with_a_broken_job_fails_before_touching_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = APIXABAN.read_text().replace("    type: yes_no\n", "    type: maybe\n", 1)
    lines = assert_user_error(invoke("run", write_job(tmp_path, source), "--output", str(tmp_path / "out")))
    assert "questions[0].type" in lines[0]
    assert not (tmp_path / "out").exists()


def test_rules_without_answers_is_a_one_line_error(tmp_path):
    lines = assert_user_error(invoke("rules", str(APIXABAN), "--answers", str(tmp_path / "missing")))
    assert "no answers under" in " ".join(lines)


def _run_output(folder: Path):
    """An output folder as `engine run` leaves it (report_fixtures: the gold answers of 12 notes), plus the
    patients/funnel.json that earlier versions wrote beside patients.parquet."""
    from report_fixtures import gold_answers, write_output_folder

    from engine.job import load_job

    job = load_job(APIXABAN)
    write_output_folder(folder, job, gold_answers(job, notes=12))
    (folder / "patients" / "funnel.json").write_text('{"funnel": []}', encoding="utf-8")


def _stricter_job(folder: Path) -> Path:
    source = APIXABAN.read_text().replace('rule: "hemoglobin_min < 9"', 'rule: "hemoglobin_min < 12"', 1)
    assert 'hemoglobin_min < 12' in source
    path = folder / "stricter.yaml"
    path.write_text(source, encoding="utf-8")
    return path


def test_rules_leaves_patients_parquet_only_and_puts_the_funnel_in_report_json(tmp_path):
    """patients/ holds only Parquet after `engine rules` (an old funnel.json is removed), so it reads as one dataset;
    the funnel of the rules just applied is report.json's cohort, and the run's other figures are kept."""
    import json

    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from engine.store.answers import answers_dataset
    from engine.job import load_job
    from engine.cohort.rules import screen

    out = tmp_path / "out"
    _run_output(out)
    before = json.loads((out / "report.json").read_text())
    job = _stricter_job(tmp_path)
    result = invoke("rules", str(job), "--answers", str(out / "answers"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "patients").iterdir()) == ["patients.parquet"]
    assert ds.dataset(out / "patients").count_rows() == pq.read_table(out / "patients").num_rows == before["patients"]
    after = json.loads((out / "report.json").read_text())
    patients, funnel = screen(answers_dataset(str(out), {}), load_job(job))
    assert after["cohort"]["funnel"] == funnel != before["cohort"]["funnel"]  # the stricter hemoglobin rule shows
    statuses = pq.read_table(out / "patients")["status"].to_pylist()
    assert after["cohort"]["status"] == {s: statuses.count(s) for s in set(statuses)}
    assert after["cohort"]["rules_applied"]
    assert {k: v for k, v in after.items() if k != "cohort"} == {k: v for k, v in before.items() if k != "cohort"}


def test_rules_into_a_new_folder_writes_a_minimal_report_json(tmp_path):
    import json

    import pyarrow.parquet as pq

    out = tmp_path / "out"
    _run_output(out)
    result = invoke("rules", str(APIXABAN), "--answers", str(out), "--output", str(tmp_path / "elsewhere"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "elsewhere" / "patients").iterdir()) == ["patients.parquet"]
    report = json.loads((tmp_path / "elsewhere" / "report.json").read_text())
    assert report["job"] == "apixaban-aristotle" and report["patients"] == pq.read_table(tmp_path / "elsewhere" / "patients").num_rows
    assert report["cohort"]["funnel"] == json.loads((out / "report.json").read_text())["cohort"]["funnel"]  # same job
