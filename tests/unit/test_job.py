"""engine.job: the real job file loads; every kind of mistake names its YAML path and line; the fingerprint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.errors import EngineError, JobError
from engine.job import IndexDateSpec, JobSpec, load_job

APIXABAN = Path(__file__).resolve().parents[2] / "jobs" / "apixaban.yaml"
SOURCE = APIXABAN.read_text(encoding="utf-8")
LINES = SOURCE.splitlines()


def line_of(text: str, occurrence: int = 1) -> int:
    """1-based line of the `occurrence`-th line of the real job file that contains `text`."""
    hits = [i + 1 for i, line in enumerate(LINES) if text in line]
    assert len(hits) >= occurrence, f"{text!r} occurs {len(hits)} times in {APIXABAN}"
    return hits[occurrence - 1]


def replace_once(source: str, old: str, new: str) -> str:
    assert source.count(old) >= 1, f"{old!r} not in the job file"
    return source.replace(old, new, 1)


def broken(tmp_path: Path, source: str) -> JobError:
    path = tmp_path / "job.yaml"
    path.write_text(source, encoding="utf-8")
    with pytest.raises(JobError) as caught:
        load_job(path)
    assert caught.value.path == str(path)
    assert str(path) in str(caught.value)
    return caught.value


def only_problem(error: JobError) -> str:
    assert len(error.problems) == 1, error.problems
    return error.problems[0]


# --- the real job -----------------------------------------------------------------------------------------

def test_apixaban_job_loads_with_23_questions_and_two_dates():
    job = load_job(APIXABAN)
    types = [q.type for q in job.questions]
    assert len(job.questions) == 25
    assert types.count("yes_no") == 15
    assert types.count("numeric") == 8
    assert [q.id for q in job.questions if q.type == "date"] == ["stroke_date", "bleeding_date"]
    assert (job.question("recent_stroke").lookback, job.question("recent_serious_bleeding").lookback) == ("30d", "6mo")
    assert job.questions[0].id == "atrial_fibrillation"
    assert job.question("creatinine_max").unit == "mg/dL"
    assert job.question("creatinine_max").units["umol/L"] == pytest.approx(0.01131)
    assert len(job.criteria) == 11
    assert job.model.evidence_max_chars == 80


def test_every_numeric_question_lists_its_canonical_unit_with_factor_one():
    job = load_job(APIXABAN)
    for q in job.questions:
        if q.type == "numeric":
            assert q.units[q.unit] == 1, q.id
            assert q.minimum < q.maximum, q.id
        else:
            assert q.unit is None and q.units == {}, q.id


# --- errors name the YAML path and line ------------------------------------------------------------------

def test_unknown_key_names_path_line_and_known_keys(tmp_path):
    source = replace_once(SOURCE, "  max_tokens: 96\n", "  max_tokens: 96\n  temperature: 0.5\n")
    problem = only_problem(broken(tmp_path, source))
    expected_line = line_of("  max_tokens: 96") + 1
    assert problem.startswith(f"model.temperature (line {expected_line}): unknown key")
    assert "known keys:" in problem and "max_tokens" in problem and "evidence_max_chars" in problem


def test_bad_value_names_question_index_and_line(tmp_path):
    # questions[3] is bipolar_disorder; its type line is the 4th "type: yes_no" in the file
    type_line = line_of("    type: yes_no", occurrence=4)
    lines = list(LINES)
    lines[type_line - 1] = "    type: maybe"
    problem = only_problem(broken(tmp_path, "\n".join(lines) + "\n"))
    assert problem.startswith(f"questions[3].type (line {type_line}):"), problem
    assert "yes_no" in problem and "numeric" in problem  # says what to write instead


def test_missing_required_field_names_path_and_line(tmp_path):
    source = replace_once(SOURCE, "    question: Does the note document that the patient has depression?\n", "")
    problem = only_problem(broken(tmp_path, source))
    # the field is absent, so the line is that of the question item it is missing from
    assert problem == f"questions[1].question (line {line_of('- id: depression')}): missing required field; add it"


def test_missing_top_level_section(tmp_path):
    source = re.sub(r"(?m)^output:\n  uri: out/apixaban\n", "", SOURCE)
    assert source != SOURCE
    problem = only_problem(broken(tmp_path, source))
    assert problem.startswith("output") and "missing required field" in problem


def test_duplicate_question_id_is_refused_with_the_id_and_line(tmp_path):
    source = replace_once(SOURCE, "- id: depression", "- id: diabetes")
    problem = only_problem(broken(tmp_path, source))
    assert problem == f"questions (line {line_of('questions:')}): duplicate question id(s): diabetes"


def test_numeric_question_without_its_canonical_unit_in_units(tmp_path):
    source = replace_once(SOURCE, "units: {mg/dL: 1, umol/L: 0.01131}", "units: {umol/L: 0.01131}")
    problem = only_problem(broken(tmp_path, source))
    creatinine = [q.id for q in load_job(APIXABAN).questions].index("creatinine_max")
    assert problem.startswith(f"questions[{creatinine}] (line {line_of('- id: creatinine_max')}):"), problem
    assert "'mg/dL'" in problem and "units" in problem


def test_canonical_unit_with_a_factor_other_than_one(tmp_path):
    source = replace_once(SOURCE, "units: {points: 1}", "units: {points: 2}")
    problem = only_problem(broken(tmp_path, source))
    assert "(line " in problem and "'points'" in problem and "factor 1" in problem


def test_several_problems_are_all_reported(tmp_path):
    source = replace_once(SOURCE, "  max_tokens: 96\n", "  max_tokens: 96\n  temperature: 0.5\n")
    source = replace_once(source, "- id: depression", "- id: diabetes")
    error = broken(tmp_path, source)
    assert len(error.problems) == 2
    assert any(p.startswith("model.temperature (line ") for p in error.problems)
    assert any("duplicate question id(s): diabetes" in p for p in error.problems)


def test_invalid_yaml_gives_a_line_number(tmp_path):
    source = replace_once(SOURCE, "model:\n", "model:\n  [bad\n")
    problem = only_problem(broken(tmp_path, source))
    match = re.match(r"line (\d+): not valid YAML", problem)
    assert match, problem
    assert abs(int(match.group(1)) - line_of("model:")) <= 2


def test_yaml_that_is_not_a_mapping(tmp_path):
    problem = only_problem(broken(tmp_path, "- just\n- a list\n"))
    assert "mapping" in problem


def test_missing_file_is_a_job_error_naming_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(JobError) as caught:
        load_job(missing)
    assert str(missing) in str(caught.value) and "cannot read" in str(caught.value)
    assert isinstance(caught.value, EngineError)


# --- fingerprint -------------------------------------------------------------------------------------------

def _variant(job: JobSpec, **changes) -> JobSpec:
    data = job.model_dump()
    for key, mutate in changes.items():
        mutate(data[key])
    return JobSpec.model_validate(data)


def test_fingerprint_is_stable_and_changes_with_a_question():
    job = load_job(APIXABAN)
    assert job.fingerprint() == load_job(APIXABAN).fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", job.fingerprint())
    reworded = _variant(job, questions=lambda qs: qs[0].update(question=qs[0]["question"] + " Answer carefully."))
    assert reworded.fingerprint() != job.fingerprint()
    widened = _variant(job, questions=lambda qs: qs[-1].update(maximum=4000.0))
    assert widened.fingerprint() != job.fingerprint()
    fewer = _variant(job, questions=lambda qs: qs.pop())
    assert fewer.fingerprint() != job.fingerprint()


def test_fingerprint_changes_with_the_model():
    job = load_job(APIXABAN)
    other = _variant(job, model=lambda m: m.update(evidence_max_chars=60))
    assert other.fingerprint() != job.fingerprint()


def test_fingerprint_ignores_criteria_derived_values_and_the_limit():
    job = load_job(APIXABAN)
    stricter = _variant(job, criteria=lambda cs: cs[5].update(rule="creatinine_max > 2.0"))
    assert stricter.criteria[5].rule != job.criteria[5].rule
    assert stricter.fingerprint() == job.fingerprint()
    fewer = _variant(job, criteria=lambda cs: cs.pop(), derived=lambda ds: ds[1].update(expr="1.5"))
    assert fewer.fingerprint() == job.fingerprint()
    limited = _variant(job, input=lambda i: i.update(limit=5))
    assert limited.fingerprint() == job.fingerprint()


# A small job whose fingerprint was computed before questions had `concept_id`: runs resume by fingerprint, so an
# optional field added to the job must not change it.
PINNED_JOB = {
    "name": "pinned", "input": {"uri": "notes.parquet"}, "output": {"uri": "out"},
    "questions": [
        {"id": "afib", "type": "yes_no", "question": "Does the note document atrial fibrillation?"},
        {"id": "creatinine_max", "type": "numeric", "question": "Highest serum creatinine in the note?", "unit": "mg/dL",
         "units": {"mg/dL": 1.0, "umol/L": 0.0113}, "maximum": 30.0},
    ],
}
PINNED_FINGERPRINT = "c8f340ff2d1aef21"


def test_fingerprint_of_a_job_without_concept_ids_is_what_it_was_before_they_existed():
    assert JobSpec.model_validate(PINNED_JOB).fingerprint() == PINNED_FINGERPRINT
    assert all("concept_id" not in q.model_dump() for q in load_job(APIXABAN).questions)


def test_concept_ids_do_not_change_the_fingerprint():
    """They name what a question asks about for `engine export`; they do not decide the answers, so adding them to
    a job after (or during) a run keeps the run resumable."""
    with_concepts = {**PINNED_JOB, "questions": [{**q, "concept_id": c} for q, c in zip(PINNED_JOB["questions"], (313217, 3016723))]}
    job = JobSpec.model_validate(with_concepts)
    assert [q.concept_id for q in job.questions] == [313217, 3016723]
    assert job.fingerprint() == PINNED_FINGERPRINT
    assert JobSpec.model_validate(PINNED_JOB).questions[0].concept_id is None


def test_concept_id_in_the_job_file_and_its_checks(tmp_path):
    indent = "    type: yes_no\n"
    job = load_job(_written(tmp_path, replace_once(SOURCE, indent, indent + "    concept_id: 313217\n")))
    assert job.questions[0].concept_id == 313217 and job.questions[1].concept_id is None
    assert job.fingerprint() == load_job(APIXABAN).fingerprint()
    for bad, message in (("-1", "greater than or equal to 0"), ('"313217"', "valid integer"), ("true", "valid integer"),
                         ("2147483648", "less than or equal to 2147483647")):
        problem = only_problem(broken(tmp_path, replace_once(SOURCE, indent, indent + f"    concept_id: {bad}\n")))
        assert problem.startswith(f"questions[0].concept_id (line {line_of('type: yes_no') + 1}): ") and message in problem, problem


def _written(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(source, encoding="utf-8")
    return path


# --- time: windows, index date, date and categorical questions ---------------------------------------------------

def test_windows_and_the_index_are_not_part_of_the_fingerprint_but_choices_are():
    job = load_job(APIXABAN)
    stroke = next(i for i, q in enumerate(job.questions) if q.id == "recent_stroke")
    longer = _variant(job, questions=lambda qs: qs[stroke].update(lookback="7d", lookahead="2d"))
    assert longer.fingerprint() == job.fingerprint()  # a window acts in the roll-up: `engine rules`, no new run
    indexed = job.model_copy(update={"index": IndexDateSpec(uri="screening.parquet")})
    assert JobSpec.model_validate(indexed.model_dump()).fingerprint() == job.fingerprint()
    typed = {"id": "af_type", "type": "categorical", "question": "Which type of AF does the note document?",
             "choices": ["paroxysmal", "persistent"]}
    with_choices = _variant(job, questions=lambda qs: qs.append(typed))
    other_choices = _variant(job, questions=lambda qs: qs.append({**typed, "choices": ["paroxysmal", "permanent"]}))
    assert with_choices.fingerprint() != other_choices.fingerprint()


@pytest.mark.parametrize("question, message", [
    ({"type": "yes_no", "lookback": "30 days"}, "is not a duration; write a whole number and d, w, mo or y"),
    ({"type": "yes_no", "lookahead": "1m"}, "is not a duration"),
    ({"type": "categorical"}, "categorical questions need 'choices'"),
    ({"type": "categorical", "choices": ["I", "II"], "synonyms": {"V": ["class 5"]}}, "'synonyms' names V, not among the choices"),
    ({"type": "categorical", "choices": ["I", "I"]}, "duplicate choice id(s): I"),
    ({"type": "yes_no", "choices": ["a", "b"]}, "'choices' and 'synonyms' are for categorical questions only"),
    ({"type": "date", "rollup": "any"}, "rollup 'any' is for yes_no questions; date questions use max, min or latest"),
    ({"type": "date", "absent": "no"}, "a date answer not in the note is unknown"),
])
def test_time_fields_are_checked(question, message):
    data = {"name": "t", "input": {"uri": "x"}, "output": {"uri": "y"},
            "questions": [{"id": "q", "question": "When did the event occur?", **question}]}
    with pytest.raises(ValueError, match=re.escape(message)):
        JobSpec.model_validate(data)


def test_an_index_column_must_be_a_structured_column_and_one_source_only():
    base = {"name": "t", "input": {"uri": "x", "structured": ["age"]}, "output": {"uri": "y"},
            "questions": [{"id": "q", "type": "yes_no", "question": "Did the event occur?", "lookback": "30d"}]}
    with pytest.raises(ValueError, match="index.column 'screening' must be one of input.structured"):
        JobSpec.model_validate({**base, "index": {"column": "screening"}})
    with pytest.raises(ValueError, match="not both"):
        JobSpec.model_validate({**base, "index": {"column": "age", "uri": "i.parquet"}})
    with pytest.raises(ValueError, match="duplicate"):  # the patient table's own index_date column
        JobSpec.model_validate({**base, "questions": [*base["questions"], {"id": "index_date", "type": "date",
                                                                           "question": "What is the index date?"}]})
    assert JobSpec.model_validate(base).uses_index_date
