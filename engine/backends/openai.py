"""OpenAI-compatible server backend: `vllm serve`, or any server that speaks the OpenAI chat completions API.

Endpoint: /v1/chat/completions with the engine's own chat messages (engine.prompt.render_messages). The server applies
the model's chat template to them, which is what the in-process vLLM backend and `engine train` do with the same
messages, so a model served by `vllm serve` sees the very tokens it would see in the engine's actors (the e2e test
checks the prompt token counts). The completions endpoint with a prompt rendered here would need the model's
tokenizer on every node, and hosted APIs offer structured outputs only for chat.

Each request carries its question's JSON schema as `response_format` json_schema, strict (vLLM: guided decoding with
the same schema the in-process engine compiles), temperature 0 and the job's seed. Requests of a batch run on a
thread pool of `model.max_concurrency`; the openai client retries connection errors, timeouts, 408, 409, 429 and 5xx
with exponential backoff (`model.max_retries`, `model.timeout_s`). A request that still fails is an error row whose
reason starts with SERVER_UNAVAILABLE; a re-run of the job asks those rows again. A request the server refuses for
good (400: too long, bad schema) is an error row too, and stays one.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

from engine.backends.base import SERVER_UNAVAILABLE, Backend, Generation, Request
from engine.backends.fit import CharacterFitter, TokenFitter
from engine.errors import BackendError
from engine.job import JobSpec, ModelSpec
from engine.plan import Plan, PlannedQuestion
from engine.prompt import render_messages

log = logging.getLogger(__name__)

NO_KEY = "EMPTY"  # sent where the server needs no key (api_key_env: null): the client wants some value
MAX_REASON_CHARS = 240
CHECK_RETRIES = 2  # the start-up check gives up sooner than a request: nothing has been asked yet


def read_api_key(spec: ModelSpec) -> str:
    """The key from the environment variable the job names; a BackendError that says what to set when it is missing."""
    if spec.api_key_env is None:
        return NO_KEY
    value = os.environ.get(spec.api_key_env, "").strip()
    if not value:
        raise BackendError(
            f"model.api_key_env names {spec.api_key_env}, which is not set (or empty) in this environment: "
            f"export {spec.api_key_env}=<your key> before the run (on a cluster, in every node's environment, e.g. from a "
            "Kubernetes Secret); never write the key in the job file. For a server without authentication set "
            "model.api_key_env: null")
    return value


def response_format(question: PlannedQuestion) -> dict:
    """The question's answer schema as an OpenAI structured-output `response_format` (vLLM: guided decoding)."""
    return {"type": "json_schema", "json_schema": {"name": question.id, "schema": question.json_schema, "strict": True}}


def describe_failure(exc: Exception, base_url: str, retries: int) -> str:
    """An error row's reason. What the client retries (connection, timeout, 408, 409, 429, 5xx) starts with
    SERVER_UNAVAILABLE, so that a re-run asks it again; a refusal for good (400, 401, 404, 422) does not."""
    import openai

    status = getattr(exc, "status_code", None)
    if isinstance(exc, openai.APIConnectionError) or status in (408, 409, 429) or (status or 0) >= 500:
        kind = "timed out" if isinstance(exc, openai.APITimeoutError) else (f"HTTP {status}" if status else "connection failed")
        reason = f"{SERVER_UNAVAILABLE}: {base_url} {kind} after {retries} retries ({_message(exc)})"
    elif status is not None:
        reason = f"model server refused the request: HTTP {status} ({_message(exc)})"
    else:
        reason = f"model server returned an unusable response ({type(exc).__name__}: {_message(exc)})"
    return reason[:MAX_REASON_CHARS]


def _message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return str(getattr(exc, "message", None) or exc)


def generation_from(response, truncated: bool) -> Generation:
    """A chat completion as the engine's Generation: the text, why it stopped, the server's token counts."""
    usage = response.usage
    details = getattr(usage, "prompt_tokens_details", None) if usage is not None else None
    tokens = dict(prompt_tokens=usage.prompt_tokens if usage else None,
                  cached_tokens=(getattr(details, "cached_tokens", None) or 0) if usage else None,
                  completion_tokens=usage.completion_tokens if usage else None)
    if not response.choices:
        return Generation(text=None, finish_reason="error", truncated=truncated, error="the model server returned no choices", **tokens)
    choice = response.choices[0]
    refusal = getattr(choice.message, "refusal", None)
    if refusal:
        return Generation(text=None, finish_reason="error", truncated=truncated, error=f"the model refused: {refusal}"[:MAX_REASON_CHARS], **tokens)
    return Generation(text=choice.message.content, finish_reason=choice.finish_reason or "stop", truncated=truncated, **tokens)


def local_tokenizer(name: str):
    """The model's tokenizer when it is on this machine (a folder, the embedded model, a hub id in the local cache),
    without any download; None for a model only the server has (then the note is cut by characters). transformers
    (and with it torch) is imported only when there is a tokenizer to load."""
    from engine.models import resolve_model

    try:
        path = resolve_model(name)
        if not os.path.isdir(path) and not _in_hub_cache(path):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - no local tokenizer is a normal case (a hosted model), not an error
        return None


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "tokenizer_config.json"), str)


def check_server(job: JobSpec) -> None:
    """Before a run: the key is set, the server answers and serves model.name. One BackendError line otherwise."""
    import openai

    spec = job.model
    client = openai.OpenAI(base_url=spec.base_url, api_key=read_api_key(spec), max_retries=min(spec.max_retries, CHECK_RETRIES),
                           timeout=min(spec.timeout_s, 30.0))
    try:
        served = [model.id for model in client.models.list()]
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        raise BackendError(f"model server {spec.base_url} refused the key in {spec.api_key_env}: {_message(exc)}") from None
    except openai.NotFoundError:
        return  # a server without GET /models: nothing to check before the first request
    except openai.APIError as exc:
        raise BackendError(f"model server {spec.base_url} cannot be reached ({_message(exc)}); start it (e.g. vllm serve "
                           f"{spec.name}) or fix model.base_url") from None
    finally:
        client.close()
    if served and spec.name not in served:
        raise BackendError(f"model server {spec.base_url} does not serve {spec.name!r} (it serves: {', '.join(served)}); set "
                           "model.name to the model as the server names it (vllm serve: --served-model-name)")


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, plan: Plan):
        super().__init__(plan)
        spec = plan.job.model
        try:
            import openai
        except ImportError as exc:
            raise BackendError(f"the openai backend needs the openai package ({exc}): pip install 'openai>=1.40'") from None
        self.client = openai.OpenAI(base_url=spec.base_url, api_key=read_api_key(spec), max_retries=spec.max_retries,
                                    timeout=spec.timeout_s)
        self.formats = {q.id: {"response_format": response_format(q)} for q in plan.questions} if spec.constrained_decoding else {}
        tokenizer = local_tokenizer(spec.name)
        self.fitter = TokenFitter(tokenizer, plan) if tokenizer is not None else CharacterFitter(plan)
        log.info("openai backend: %s at %s, notes cut by %s", spec.name, spec.base_url,
                 "the model's tokenizer" if tokenizer is not None else "characters (no local tokenizer)")
        self.pool = ThreadPoolExecutor(max_workers=spec.max_concurrency, thread_name_prefix="openai-request")

    def generate(self, requests: list[Request]) -> list[Generation]:
        fitted: dict[str, tuple[str, bool]] = {}
        asks = []
        for request in requests:
            if request.note_key not in fitted:
                fitted[request.note_key] = self.fitter.fit(request.note_text)
            text, truncated = fitted[request.note_key]
            asks.append((render_messages(text, request.question, request.hint), request.question.id, truncated))
        return list(self.pool.map(self._ask, asks))  # in request order, at most max_concurrency in flight

    def _ask(self, ask: tuple[list[dict], str, bool]) -> Generation:
        import openai

        messages, question_id, truncated = ask
        spec = self.plan.job.model
        try:
            response = self.client.chat.completions.create(
                model=spec.name, messages=messages, max_completion_tokens=spec.max_tokens, temperature=0.0, seed=spec.seed,
                **self.formats.get(question_id, {}))
        except openai.APIError as exc:
            return Generation(text=None, finish_reason="error", prompt_tokens=None, cached_tokens=None, completion_tokens=None,
                              truncated=truncated, error=describe_failure(exc, spec.base_url, spec.max_retries))
        return generation_from(response, truncated)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
