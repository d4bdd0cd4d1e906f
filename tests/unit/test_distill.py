"""engine.distill.synth: training examples in exactly the served prompt and answer format, every target checked by
the served chain, balanced, split by patient; and `engine synth` writes them with a card whose counts add up."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import xgrammar
from typer.testing import CliRunner
from xgrammar.testing import _is_grammar_accept_string

from conftest import APIXABAN_JOB
from engine.cli import app
from engine.distill.synth import (Example, balance, gold_target, label_of, read_examples, renderer_hash, split,
                                  windowed)
from engine.job import load_job
from engine.plan import make_plan
from engine.prompt import NOTE_HEADER, QUESTION_HEADER, SYSTEM_PROMPT, render_messages

JOB = load_job(APIXABAN_JOB)
PLAN = make_plan(JOB)
Q = PLAN.by_id


def example(question: str, label: str, patient: str = "p1", hardness: float = 0.0, note: str = "n1") -> Example:
    return Example(note, patient, question, "cues", label, "{}", [], hardness)


# --- answer classes ----------------------------------------------------------------------------------------------
def test_the_answer_class_reads_the_field_that_holds_the_answer():
    assert label_of(Q["atrial_fibrillation"], {"evidence": "AF", "answer": "yes"}) == "yes"
    assert label_of(Q["atrial_fibrillation"], {"evidence": "", "answer": "not_in_note"}) == "not_in_note"
    assert label_of(Q["creatinine_max"], {"evidence": "Cr 2.1", "value": "2.1", "unit": "mg/dL"}) == "value"
    assert label_of(Q["creatinine_max"], {"evidence": "", "value": None, "unit": None}) == "not_in_note"
    said = {"evidence": "stroke on 2024-03-02", "phrase": "2024-03-02", "date": "2024-03-02"}
    assert label_of(Q["stroke_date"], said) == "value"
    assert label_of(Q["stroke_date"], {"evidence": "", "phrase": None, "date": None}) == "not_in_note"


# --- windows -----------------------------------------------------------------------------------------------------
def test_windows_cut_at_line_ends_and_keep_every_line():
    lines = [f"line {i:02d} " + "x" * 40 + "\n" for i in range(20)]
    notes = pa.table({"note_id": ["a", "b"], "text": ["".join(lines), "short note"]})
    cut = windowed(notes, "text", "note_id", 200)
    rows = cut.to_pylist()
    a = [r for r in rows if r["note_id"].startswith("a#w")]
    assert [r["note_id"] for r in a] == [f"a#w{k}" for k in range(len(a))] and len(a) > 3
    assert "".join(r["text"] for r in a) == "".join(lines)  # nothing lost, nothing repeated
    assert all(len(r["text"]) <= 200 for r in a) and all(r["text"].endswith("\n") for r in a)
    assert [r for r in rows if r["note_id"] == "b#w0"][0]["text"] == "short note"
    assert windowed(notes, "text", "note_id", None) is notes


def test_a_line_longer_than_the_window_is_a_window_of_its_own():
    text = "short\n" + "y" * 500 + "\nend\n"
    cut = windowed(pa.table({"note_id": ["a"], "text": [text]}), "text", "note_id", 100).to_pylist()
    assert ["y" * 500 + "\n" in r["text"] for r in cut].count(True) == 1
    assert "".join(r["text"] for r in cut) == text


# --- balance and split -------------------------------------------------------------------------------------------
def test_balance_gives_each_question_and_class_an_equal_share_hardest_first():
    pool = ([example("atrial_fibrillation", "not_in_note", hardness=h) for h in range(50)]
            + [example("atrial_fibrillation", "yes", hardness=h) for h in range(5)]
            + [example("creatinine_max", "value", hardness=h) for h in range(20)])
    chosen = balance(pool, 15, seed=0)
    counts = Counter((e.question_id, e.label) for e in chosen)
    assert len(chosen) == 15
    assert counts[("atrial_fibrillation", "yes")] == 5  # all of the rare class
    assert counts[("atrial_fibrillation", "not_in_note")] == counts[("creatinine_max", "value")] == 5
    hardest = sorted((e.hardness for e in chosen if e.label == "not_in_note"), reverse=True)
    assert hardest == [49, 48, 47, 46, 45]
    assert len(balance(pool, None, seed=0)) == len(pool)


def test_a_class_short_of_its_share_gives_the_rest_to_the_others():
    pool = [example("q1", "yes")] + [example("q1", "no") for _ in range(30)]
    assert Counter(e.label for e in balance(pool, 10, seed=0)) == {"yes": 1, "no": 9}


def test_the_split_is_by_patient_and_repeats():
    pool = [example("q", "yes", patient=f"p{i % 40}", note=f"n{i}") for i in range(200)]
    train, held = split(pool, 0.2, seed=3)
    assert len(train) + len(held) == 200 and held and train
    assert not {e.patient_id for e in train} & {e.patient_id for e in held}
    again = split(pool, 0.2, seed=3)
    assert [e.note_id for e in again[1]] == [e.note_id for e in held]


# --- gold targets ------------------------------------------------------------------------------------------------
def test_a_gold_yes_quotes_the_mention_the_cues_counted():
    text = "HPI: 70M.\nPMH: paroxysmal atrial fibrillation on warfarin.\n"
    start = text.index("atrial fibrillation")
    gold = {"value_bool": True, "value_num": None, "unit": None}
    target = gold_target(text, Q["atrial_fibrillation"], gold, f"{start}-{start + 19}", 40)
    assert target["answer"] == "yes" and target["evidence"] in text and "atrial fibrillation" in target["evidence"]
    assert gold_target(text, Q["atrial_fibrillation"], gold, None, 40) is None  # no counted mention: no example
    assert gold_target(text, Q["atrial_fibrillation"], dict(gold, value_bool=None), None, 40)["answer"] == "not_in_note"


def test_a_gold_number_is_taught_only_with_a_quote_that_holds_it():
    text = "Labs on admission:\nCreatinine 2.4 mg/dL (baseline 1.1)\nHgb 11.2\n"
    gold = {"value_bool": None, "value_num": 2.4, "unit": "mg/dL"}
    target = gold_target(text, Q["creatinine_max"], gold, None, 40)
    assert target["value"] == "2.4" and "2.4" in target["evidence"] and target["evidence"] in text
    assert gold_target(text, Q["creatinine_max"], dict(gold, value_num=3.9), None, 40) is None
    assert gold_target(text, Q["creatinine_max"], dict(gold, value_num=None), None, 40)["value"] is None


# --- engine synth, end to end ------------------------------------------------------------------------------------
def test_every_example_is_the_served_prompt_and_a_grammar_valid_answer(synth_folder):
    records = read_examples(synth_folder / "train.jsonl") + read_examples(synth_folder / "eval.jsonl")
    assert records
    grammars = {}
    for r in records:
        question = Q[r["question_id"]]
        system, user, answer = r["messages"]
        assert system == {"role": "system", "content": SYSTEM_PROMPT} and answer["role"] == "assistant"
        # the user turn is render_messages of the text it carries, with no hint or (hybrid form) a cue hint after it
        content = user["content"]
        assert content.startswith(NOTE_HEADER) and QUESTION_HEADER in content
        bare = render_messages(content[len(NOTE_HEADER):content.rindex(QUESTION_HEADER)], question)[1]["content"]
        rest = content[len(bare):]
        assert content.startswith(bare) and (rest == "" or (rest.startswith("\n(") and rest.endswith(")"))), content[-200:]
        if question.spec.type == "date" and not rest:
            pytest.fail(f"{r['note_id']}: a date question is served with the note's date")
        if question.spec.type == "date" and "Note date:" not in rest:
            pytest.fail(f"{r['note_id']}: the date hint is missing: {rest!r}")
        parsed = question.answer_model.model_validate_json(answer["content"])
        assert json.dumps(parsed.model_dump(mode="json"), separators=(",", ":"), ensure_ascii=False) == answer["content"]
        grammar = grammars.setdefault(question.id, xgrammar.Grammar.from_json_schema(
            json.dumps(question.json_schema), any_whitespace=False, separators=(",", ":")))
        assert _is_grammar_accept_string(grammar, answer["content"]), answer["content"]
        assert label_of(question, parsed.model_dump(mode="json")) == r["label"]
        evidence = parsed.model_dump()["evidence"]
        assert not evidence or evidence in user["content"]  # every quote is the note's own text


def test_the_card_counts_what_was_written(synth_folder):
    card = json.loads((synth_folder / "synth.json").read_text(encoding="utf-8"))
    train, held = read_examples(synth_folder / "train.jsonl"), read_examples(synth_folder / "eval.jsonl")
    assert card["renderer"] == renderer_hash() and card["job"] == JOB.name
    assert card["train"]["examples"] == len(train) <= 120 and card["eval"]["examples"] == len(held)
    assert card["train"]["by_label"] == dict(Counter(r["label"] for r in train))
    assert set(card["train"]["by_source"]) <= {"cues", "synthetic"} and card["candidates"]["synthetic"] > 0
    assert not {r["patient_id"] for r in train} & {r["patient_id"] for r in held}
    assert {"yes", "not_in_note", "value"} <= set(card["train"]["by_label"])


def test_synth_without_a_source_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["synth", str(APIXABAN_JOB), "--output", str(tmp_path), "--synthetic-patients", "0"])
    assert result.exit_code == 1 and "nothing to make examples from" in result.output


# --- an adapter the engine can serve ---------------------------------------------------------------------------
def test_an_adapter_folder_is_checked_before_a_model_loads(tmp_path):
    from engine.backends.vllm import check_adapter
    from engine.errors import BackendError

    with pytest.raises(BackendError, match="no adapter_config.json there.*engine train"):
        check_adapter(str(tmp_path), 16)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 64, "peft_type": "LORA"}), encoding="utf-8")
    with pytest.raises(BackendError, match="rank 64, above model.max_lora_rank 16"):
        check_adapter(str(tmp_path), 16)
    assert check_adapter(str(tmp_path), 64) == str(tmp_path.resolve())


def test_train_refuses_a_folder_synth_did_not_write(tmp_path):
    (tmp_path / "train.jsonl").write_text("", encoding="utf-8")
    result = CliRunner().invoke(app, ["train", str(APIXABAN_JOB), "--data", str(tmp_path), "--output", str(tmp_path / "a")])
    assert result.exit_code == 1 and "engine synth" in result.output


def test_train_refuses_data_rendered_with_another_prompt(synth_folder, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_folder, data)
    card = json.loads((data / "synth.json").read_text(encoding="utf-8"))
    (data / "synth.json").write_text(json.dumps(dict(card, renderer="0123456789ab")), encoding="utf-8")
    result = CliRunner().invoke(app, ["train", str(synth_folder.parent / "job.yaml"), "--data", str(data), "--output", str(tmp_path / "a")])
    assert result.exit_code == 1 and "another prompt" in result.output


def test_synthetic_notes_for_a_job_the_generator_does_not_fit_are_refused(tmp_path):
    """The generator's gold follows the job synth is given; a job without one of the questions its notes document
    is refused with what to do instead, and the generator keeps the questions it had."""
    from engine.distill.synth import from_synthetic
    from engine.errors import InputError
    from engine.tools import synthetic

    job = load_job(APIXABAN_JOB)
    smaller = job.model_copy(update={"questions": [q for q in job.questions if q.id != "peptic_ulcer"]})
    before = synthetic.QUESTION_IDS
    with pytest.raises(InputError, match=r"peptic_ulcer is not a yes/no question of the job.*--synthetic-patients 0"):
        from_synthetic(smaller, make_plan(smaller), 2, 0, tmp_path, Counter())
    assert synthetic.QUESTION_IDS == before and "peptic_ulcer" in before


def test_a_windowed_job_is_taught_the_windows_it_serves(tmp_path, tiny_model):
    """model_sees: windows: each example shows exactly what the served candidate stage shows the model (the text
    around the question's mentions), a pair without a mention is no example (no model is asked it), and every
    target's quote is in the text shown."""
    import pyarrow.parquet as pq

    from conftest import SAMPLE_NOTES
    from engine.distill.synth import synth
    from engine.stages.candidates import shown_text

    job = JOB.model_copy(update={
        "model": JOB.model.model_copy(update={"name": str(tiny_model)}),
        "extraction": JOB.extraction.model_copy(update={"mode": "model", "model_sees": "windows", "window_chars": 120}),
    })
    plan = make_plan(job)
    card = synth(job, tmp_path, notes=str(SAMPLE_NOTES), synthetic_patients=0, limit=5)
    records = read_examples(tmp_path / "train.jsonl") + read_examples(tmp_path / "eval.jsonl")
    notes = dict(zip(*pq.read_table(SAMPLE_NOTES, columns=["note_id", "text"]).to_pydict().values()))
    assert records and card.dropped.get("cues: no mention, so the job never asks a model", 0) > 0
    for r in records:
        question, text = Q[r["question_id"]], notes[r["note_id"]]
        user = r["messages"][1]["content"]
        shown = user[len(NOTE_HEADER):user.rindex(QUESTION_HEADER)]
        assert shown == shown_text(text, question, plan) and len(shown) <= len(text)
        evidence = json.loads(r["messages"][2]["content"])["evidence"]
        assert not evidence or evidence in shown
