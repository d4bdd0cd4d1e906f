"""Trial criteria as rules over the patient table: a rule decides, the model is never asked yes/no.

Rules (`derived[].expr`, `criteria[].rule`) are DuckDB SQL expressions with three-valued logic: NULL is
unknown and AND/OR/NOT are Kleene. User text is never run as Python and never pasted into a query:
each expression is parsed on its own, must be exactly ONE scalar expression (no FROM, no second
statement, no subquery, aggregate or window), and is evaluated as a parsed `duckdb.Expression` on an
in-memory connection that cannot read files or load extensions.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.errors import JobError
from engine.job import RESERVED_PATIENT_COLUMNS, JobSpec, parse_duration
from engine.cohort.rollup import patient_schema, rollup_answers
from engine.cohort.sql import SPAN_FUNCTIONS, identifier, sandbox

STATES = ("met", "not_met", "unknown")
_UNKNOWN_AS = {"met": "TRUE", "not_met": "FALSE", "needs_review": "NULL"}


def check_rules(job: JobSpec, structured_types: Mapping[str, pa.DataType] | None = None) -> list[str]:
    """One message per problem in the job's derived values and criteria; [] when all bind and type-check.

    Checks run against an empty table typed exactly as roll-up's output. Pass the input's types of the
    structured columns (e.g. {"sex": pa.string(), "age": pa.int64()}) for a full type check; without
    them those columns are typed NULL, which DuckDB accepts wherever any type is.
    """
    con = sandbox()
    _, problems = _bind(con, con.from_arrow(patient_schema(job, structured_types).empty_table()), job)
    return problems


def apply_rules(patients: pa.Table, job: JobSpec) -> pa.Table:
    """The patient table plus derived columns, one met/not_met/unknown column per criterion, status, reasons.

    status: 'excluded' if an exclusion is met or an inclusion not met (unknown read as the criterion's
    `unknown:`), else 'needs_review' if a criterion is unknown with `unknown: needs_review`, else 'eligible'.
    reasons: the ids of the criteria that decided a non-eligible status, in job order. Raises JobError
    if a rule does not check against this table.

    A criterion that is unknown while a question it needs rests on an answer held back by the review settings
    needs review whatever its `unknown:` says: with `review.require_grounded_evidence` ungrounded evidence
    (roll-up's `<question>__ungrounded`; reason "<criterion>: <question(s)> evidence not found in note",
    `<criterion>__ungrounded` true), with `review.require_verified_answers` a model answer that failed its check
    against the note (`<question>__unverified`; reason "<criterion>: <question(s)> model answer not verified
    against the note", `<criterion>__unverified` true).
    """
    con = sandbox()
    numbered = patients.append_column("__row", pa.array(np.arange(patients.num_rows), pa.int64()))
    relation, problems = _bind(con, con.from_arrow(numbered), job)
    if problems:
        raise JobError("rules", problems)
    relation.create_view("ruled")
    added = con.sql(f"SELECT {_decision_sql(job, _held_sql(con, job))} FROM ruled ORDER BY __row").to_arrow_table()
    added = added.set_column(added.schema.get_field_index("reasons"), "reasons",
                             added["reasons"].cast(pa.list_(pa.string())))
    for name in added.column_names:
        patients = patients.append_column(name, added[name])
    return patients


def cohort_funnel(patients: pa.Table, job: JobSpec) -> list[dict]:
    """Per criterion in job order: met/not_met/unknown counts and how many patients are still in the running.

    A patient drops out at the first criterion that excludes it; one whose criterion is unknown with
    `unknown: needs_review` stays in the running and is counted in `needs_review`. Accepts the output of
    apply_rules (rules are applied first when the criterion columns are missing).
    """
    if any(c.id not in patients.column_names for c in job.criteria):
        patients = apply_rules(patients, job)
    running = np.ones(patients.num_rows, dtype=bool)
    funnel = []
    for c in job.criteria:
        column = patients[c.id]
        is_ = {s: pc.fill_null(pc.equal(column, s), False).to_numpy(zero_copy_only=False) for s in STATES}
        excludes = _excludes(is_, c.kind, c.unknown)
        review = is_["unknown"] & (c.unknown == "needs_review")
        entering = int(running.sum())
        row = {"criterion": c.id, "kind": c.kind, **{s: int(is_[s].sum()) for s in STATES},
               "entering": entering, "excluded": int((running & excludes).sum()),
               "needs_review": int((running & review).sum())}
        running &= ~excludes
        funnel.append({**row, "remaining": int(running.sum())})
    return funnel


def screen(answers, job: JobSpec) -> tuple[pa.Table, list[dict]]:
    """Answers (a table, or the committed files as a pyarrow dataset) to decisions: roll up per patient, apply
    the rules, count the funnel."""
    patients = apply_rules(rollup_answers(answers, job), job)
    return patients, cohort_funnel(patients, job)


def _excludes(is_: dict[str, np.ndarray], kind: str, unknown: str) -> np.ndarray:
    """Which patients this criterion excludes (from one boolean mask per state), with unknown read as the
    criterion says."""
    excluding = "met" if kind == "exclusion" else "not_met"
    return is_[excluding] | (is_["unknown"] if unknown == excluding else False)


def _bind(con: duckdb.DuckDBPyConnection, relation: duckdb.DuckDBPyRelation, job: JobSpec):
    """Add derived columns in order, then one boolean `__rule_<id>` per criterion; collect problems.

    A derived value that fails is added as NULL so later rules are judged on their own mistakes only.
    """
    problems = _name_clashes(relation.columns, job)
    if problems:
        return relation, problems
    known = [n for n in relation.columns if "__" not in n]
    aggregates = _aggregate_names()
    compile_ = lambda text, path, boolean: _compile(con, relation, text, path, known, aggregates, job, boolean)  # noqa: E731
    for i, d in enumerate(job.derived):
        expr, problem = compile_(d.expr, f"derived[{i}].expr", False)
        relation = relation.select(duckdb.StarExpression(), expr.alias(d.id))
        known.append(d.id)
        problems += [problem] if problem else []
    rules = []
    for i, c in enumerate(job.criteria):
        expr, problem = compile_(c.rule, f"criteria[{i}].rule", True)
        rules.append(expr.alias(f"__rule_{c.id}"))
        problems += [problem] if problem else []
    return (relation if problems else relation.select(duckdb.StarExpression(), *rules)), problems


@functools.cache
def _aggregate_names() -> frozenset[str]:
    """Names of DuckDB's aggregate functions (a rule must not use them: it sees one patient's row)."""
    query = "SELECT DISTINCT function_name FROM duckdb_functions() WHERE function_type = 'aggregate'"
    con = sandbox()
    return frozenset(row[0] for row in con.sql(query).fetchall())


def _compile(con, relation, text: str, path: str, known: list[str], aggregates: frozenset[str], job: JobSpec,
             boolean: bool) -> tuple[duckdb.Expression, str | None]:
    """The parsed, bound expression and None, or a NULL stand-in and the problem (one message)."""
    expr, problem = _expression(con, text, path, known, aggregates, job)
    if expr is not None:
        problem = _try_type(relation, expr, path, need_boolean=boolean)
    return (duckdb.ConstantExpression(None) if problem else expr), problem


def _name_clashes(columns: list[str], job: JobSpec) -> list[str]:
    """Derived and criterion ids become columns: they must not shadow an input column or a reserved name."""
    ids = {q.id for q in job.questions} | {d.id for d in job.derived} | {c.id for c in job.criteria} | set(RESERVED_PATIENT_COLUMNS)
    bad = [(f"input.structured[{i}]", s) for i, s in enumerate(job.input.structured) if s in ids or "__" in s]
    if bad:
        return [f"{path}: {name!r} clashes with a question, derived or criterion id, a reserved name or the "
                f"'__' of note_id/evidence columns; rename it" for path, name in bad]
    taken = {n.lower() for n in columns} | set(RESERVED_PATIENT_COLUMNS)
    clashes = [(f"derived[{i}].id", d.id) for i, d in enumerate(job.derived) if d.id in taken]
    clashes += [(f"criteria[{i}].id", c.id) for i, c in enumerate(job.criteria) if c.id in taken]
    return [f"{path}: {name!r} is already a column of the patient table or reserved; rename it"
            for path, name in clashes]


def _expression(con, text: str, path: str, known: list[str], aggregates: frozenset[str], job: JobSpec):
    """Parse `text` as exactly one scalar expression over `known` names; (Expression, None) or (None, message)."""
    parsed = json.loads(con.execute("SELECT json_serialize_sql(?)", ["SELECT " + text]).fetchone()[0])
    if parsed.get("error") and parsed.get("error_type") != "parser":  # e.g. "x; DROP TABLE t"
        return None, f"{path}: must be one expression, not a statement or command: {text!r}"
    if parsed.get("error"):
        return None, f"{path}: not a valid SQL expression ({parsed.get('error_message', 'parse error')}): {text!r}"
    problem = _shape_problem(parsed["statements"])
    if problem:
        return None, f"{path}: {problem}: {text!r}"
    nodes = list(_walk(parsed["statements"][0]["node"]["select_list"][0]))
    problem = _content_problem(nodes, known, aggregates, job)
    if problem:
        return None, f"{path}: {problem}"
    return duckdb.SQLExpression(text), None


def _shape_problem(statements: list[dict]) -> str | None:
    """Anything beyond one bare select item (FROM, WHERE, a second statement, alias, LIMIT...) is refused."""
    if len(statements) != 1:
        return "must be one expression, not several statements"
    node = statements[0]["node"]
    if node.get("type") != "SELECT_NODE" or len(node.get("select_list", [])) != 1:
        return "must be one expression (no commas at the top level, no UNION)"
    extra = [node.get("from_table", {}).get("type") != "EMPTY", node.get("where_clause"), node.get("group_expressions"),
             node.get("having"), node.get("qualify"), node.get("sample"), node.get("modifiers"),
             node.get("cte_map", {}).get("map"), node["select_list"][0].get("alias")]
    return "must be one expression, without FROM, WHERE, GROUP BY, LIMIT or AS" if any(extra) else None


def _walk(node):
    """Every expression node (dicts with a 'class') in a parsed expression tree."""
    if isinstance(node, dict):
        if "class" in node:
            yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _content_problem(nodes: list[dict], known: list[str], aggregates: frozenset[str], job: JobSpec) -> str | None:
    """Refuse what does not fit 'one patient row in, one value out', and names that are not columns."""
    classes = {n["class"] for n in nodes}
    for cls, why in (("SUBQUERY", "subqueries"), ("WINDOW", "window functions"), ("STAR", "'*'")):
        if cls in classes:
            return f"{why} are not allowed: a rule sees one patient's row"
    functions = sorted({n["function_name"].lower() for n in nodes if n["class"] == "FUNCTION"} & aggregates)
    if functions:
        return f"aggregate function(s) {', '.join(functions)} are not allowed: a rule sees one patient's row"
    problem = _span_problem(nodes)
    if problem:
        return problem
    params = {".".join(ref["column_names"]).lower() for n in nodes if n["class"] == "LAMBDA" for ref in _walk(n["lhs"])
              if ref["class"] == "COLUMN_REF"}
    names = [".".join(n["column_names"]) for n in nodes if n["class"] == "COLUMN_REF"]
    lowered = {k.lower() for k in known}
    unknown = sorted({n for n in names if n.lower() not in lowered | params})
    if not unknown:
        return None
    later = {d.id for d in job.derived} - lowered
    hint = " (derived values can only use those defined before them)" if later & set(unknown) else ""
    return f"unknown name(s) {', '.join(unknown)}{hint}; known names: {', '.join(known)}"


def _span_problem(nodes: list[dict]) -> str | None:
    """within()'s span is a literal duration in the job's own form ('30d', '6mo'): a typo there would otherwise make
    every patient's date check unknown."""
    for node in nodes:
        if node["class"] != "FUNCTION" or node["function_name"].lower() not in SPAN_FUNCTIONS:
            continue
        name, at = node["function_name"].lower(), SPAN_FUNCTIONS[node["function_name"].lower()]
        children = node.get("children", [])
        arg = children[at] if len(children) > at else None
        value = (arg or {}).get("value") or {}
        if arg is None or arg["class"] != "CONSTANT" or value.get("is_null") or value.get("type", {}).get("id") != "VARCHAR":
            return f"{name}() takes a literal duration as its argument {at + 1}, e.g. {name}(stroke_date, index_date, '30d')"
        try:
            parse_duration(value["value"])
        except ValueError as exc:
            return f"{name}(): {exc}"
    return None


def _try_type(relation: duckdb.DuckDBPyRelation, expr: duckdb.Expression, path: str, need_boolean: bool) -> str | None:
    """Bind `expr` against the relation; report a binder or type error, or a non-boolean criterion."""
    try:
        kind = str(relation.select(expr).types[0])
    except duckdb.Error as exc:
        return f"{path}: {str(exc).splitlines()[0]}"
    if need_boolean and kind != "BOOLEAN":
        return f"{path}: a criterion must be boolean (true/false/unknown), this rule gives {kind}"
    return None


def _decision_sql(job: JobSpec, held: dict[str, list[tuple[str, str, str]]] | None = None) -> str:
    """Derived columns, per-criterion state, status and reasons: SQL over identifiers only, never user text.

    `held`: per criterion, (flag suffix, condition, reason) SQL for each way it can be "unknown because an answer
    it needs is held back" (_held_sql); such a criterion needs review whatever its `unknown:` says.
    """
    held = held or {}
    flag = {c.id: " OR ".join(cond for _, cond, _ in held.get(c.id, [])) or "FALSE" for c in job.criteria}
    raw = {c.id: f'"__rule_{identifier(c.id)}"' for c in job.criteria}
    states = [f"CASE WHEN {raw[c.id]} THEN 'met' WHEN NOT {raw[c.id]} THEN 'not_met' ELSE 'unknown' END AS \"{c.id}\""
              for c in job.criteria]
    excl = [f"coalesce({raw[c.id]}, CASE WHEN {flag[c.id]} THEN NULL ELSE {_UNKNOWN_AS[c.unknown]} END) "
            f"IS {'TRUE' if c.kind == 'exclusion' else 'FALSE'}" for c in job.criteria]
    review = [f"({raw[c.id]} IS NULL AND ({c.unknown == 'needs_review'} OR {flag[c.id]}))" for c in job.criteria]
    ids = [f"'{identifier(c.id)}'" for c in job.criteria]
    review_ids = [_held_reason(held.get(c.id, []), i) for c, i in zip(job.criteria, ids, strict=True)]
    any_excl, any_review = " OR ".join(excl) or "FALSE", " OR ".join(review) or "FALSE"
    status = f"CASE WHEN {any_excl} THEN 'excluded' WHEN {any_review} THEN 'needs_review' ELSE 'eligible' END AS status"
    reasons = (f"CASE WHEN {any_excl} THEN {_pick(ids, excl)} WHEN {any_review} THEN {_pick(review_ids, review)} "
               f"ELSE []::VARCHAR[] END AS reasons")
    derived = [f'"{identifier(d.id)}"' for d in job.derived]
    flags = [f'{cond} AS "{c.id}__{suffix}"' for c in job.criteria for suffix, cond, _ in held.get(c.id, [])]
    return ", ".join([*derived, *states, status, reasons, *flags])


def _held_reason(ways: list[tuple[str, str, str]], plain_id: str) -> str:
    """The reason of a held criterion: the first way it is held, else its plain id."""
    if not ways:
        return plain_id
    return "CASE " + " ".join(f"WHEN {cond} THEN {reason}" for _, cond, reason in ways) + f" ELSE {plain_id} END"


HOLDS = (  # (review setting, roll-up flag suffix, reason after the question ids)
    ("require_grounded_evidence", "ungrounded", "evidence not found in note"),
    ("require_verified_answers", "unverified", "model answer not verified against the note"),
)


def _held_sql(con: duckdb.DuckDBPyConnection, job: JobSpec) -> dict[str, list[tuple[str, str, str]]]:
    """Per criterion, for each review setting that is on: (flag suffix, is it unknown on a held answer, reason)."""
    active = [(suffix, reason) for setting, suffix, reason in HOLDS if getattr(job.review, setting)]
    if not active:
        return {}
    needs = question_dependencies(con, job)
    result: dict[str, list[tuple[str, str, str]]] = {}
    for c in job.criteria:
        for suffix, reason in active:
            flags = [(q, f'"{identifier(q)}__{suffix}"') for q in needs[c.id]]
            if not flags:
                result.setdefault(c.id, []).append((suffix, "FALSE", f"'{identifier(c.id)}'"))
                continue
            named = ", ".join(f"CASE WHEN {f} THEN '{q}' END" for q, f in flags)
            questions = f"array_to_string([x FOR x IN list_value({named}) IF x IS NOT NULL], ', ')"
            condition = f'("__rule_{identifier(c.id)}" IS NULL AND ({" OR ".join(f for _, f in flags)}))'
            result.setdefault(c.id, []).append((suffix, condition, f"'{identifier(c.id)}: ' || {questions} || ' {reason}'"))
    return result


def question_dependencies(con: duckdb.DuckDBPyConnection, job: JobSpec) -> dict[str, list[str]]:
    """The question ids each criterion's rule reads, directly or through derived values, in job order."""
    questions = [q.id for q in job.questions]
    reads: dict[str, set[str]] = {}
    for d in job.derived:
        reads[d.id] = _names(con, d.expr, reads)
    return {c.id: [q for q in questions if q in _names(con, c.rule, reads)] for c in job.criteria}


def _names(con: duckdb.DuckDBPyConnection, text: str, derived: dict[str, set[str]]) -> set[str]:
    """Column names an expression reads (lowercase), with derived values replaced by what they read."""
    parsed = json.loads(con.execute("SELECT json_serialize_sql(?)", ["SELECT " + text]).fetchone()[0])
    nodes = _walk(parsed.get("statements", []))
    names = {".".join(n["column_names"]).lower() for n in nodes if n.get("class") == "COLUMN_REF"}
    return set().union(*(derived.get(n, {n}) for n in names)) if names else set()


def _pick(ids: list[str], conditions: list[str]) -> str:
    """A list of the ids whose condition holds, in order (a list comprehension over CASE values)."""
    if not ids:
        return "[]::VARCHAR[]"
    items = ", ".join(f"CASE WHEN {cond} THEN {cid} END" for cid, cond in zip(ids, conditions, strict=True))
    return f"[x FOR x IN list_value({items}) IF x IS NOT NULL]"


