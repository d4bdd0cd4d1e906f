"""engine train: a LoRA adapter (peft) on the job's model from `engine synth` data, served later by vLLM's LoRA support.

The loss is on the answer only: each example is tokenised exactly as vLLM is sent it (the model's chat template
with the generation prompt) followed by the answer the grammar would write and the template's end of turn.
transformers' Trainer runs the loop: a progress bar with ETA, checkpoints every `save_steps`, resume from the last
checkpoint when the same command runs again, fixed seeds. The card (train.json, beside the adapter) records the
data, steps, losses, time and tokens per second.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.distill.synth import read_examples, renderer_hash
from engine.errors import EngineError
from engine.job import JobSpec

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LABEL_IGNORE = -100


class TrainError(EngineError):
    """Training data or settings the engine cannot train on; the message says what to do."""


@dataclass
class TrainSettings:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 1
    gradient_accumulation: int = 8
    warmup_ratio: float = 0.05
    save_steps: int = 25
    seed: int = 0
    max_length: int = 4096


@dataclass
class TrainCard:
    job: str
    base_model: str
    data: str
    synth_card: dict
    settings: dict
    examples: int = 0
    eval_examples: int = 0
    steps: int = 0
    resumed_from: str | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_loss_before: float | None = None
    losses: list = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    tokens_per_second: float = 0.0
    device: str = "cpu"


def encode(tokenizer, record: dict, max_length: int) -> dict | None:
    """input_ids/labels for one chat record: labels only on the answer (and the end-of-turn after it)."""
    messages = record["messages"]
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise TrainError("the model's chat template does not render the prompt as a prefix of the conversation; "
                         "this model cannot be trained on the engine's format")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    ids = prompt_ids + answer_ids
    if len(ids) > max_length:
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [LABEL_IGNORE] * len(prompt_ids) + answer_ids}


def _dataset(tokenizer, path: Path, max_length: int):
    from datasets import Dataset

    records = read_examples(path)
    encoded = [e for e in (encode(tokenizer, r, max_length) for r in records) if e is not None]
    skipped = len(records) - len(encoded)
    if skipped:
        log.warning("%s: %d examples longer than %d tokens left out", path, skipped, max_length)
    return Dataset.from_list(encoded) if encoded else None


def _synth_card(data: Path) -> dict:
    card_path = data / "synth.json"
    if not (data / "train.jsonl").exists() or not card_path.exists():
        raise TrainError(f"{data} has no train.jsonl and synth.json; make it with: python -m engine synth JOB --output {data}")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    if card.get("renderer") != renderer_hash():
        raise TrainError(f"{data} was rendered with another prompt ({card.get('renderer')} != {renderer_hash()}): "
                         "training on it would teach a format the engine no longer serves; rebuild it with engine synth")
    return card


def last_checkpoint(output: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    folder = output / CHECKPOINTS
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def train(job: JobSpec, data: Path, output: Path, settings: TrainSettings, *, resume: bool = True) -> TrainCard:
    """Train a LoRA adapter on data/train.jsonl; write it, its tokenizer and train.json to `output`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments, set_seed)

    from engine.models import resolve_model

    synth_card = _synth_card(data)
    if synth_card.get("job_fingerprint") and synth_card["job"] != job.name:
        raise TrainError(f"{data} was made for job {synth_card['job']!r}, not {job.name!r}")
    set_seed(settings.seed)
    base = resolve_model(job.model.name)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_length = min(settings.max_length, job.model.max_model_len)
    train_set = _dataset(tokenizer, data / "train.jsonl", max_length)
    if train_set is None:
        raise TrainError(f"{data / 'train.jsonl'} has no example that fits {max_length} tokens")
    eval_set = _dataset(tokenizer, data / "eval.jsonl", max_length) if (data / "eval.jsonl").exists() else None
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(output / CHECKPOINTS), per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=1, gradient_accumulation_steps=settings.gradient_accumulation,
        learning_rate=settings.learning_rate, num_train_epochs=settings.epochs, max_steps=settings.max_steps,
        warmup_steps=settings.warmup_ratio, lr_scheduler_type="cosine", logging_steps=1,
        save_strategy="steps", save_steps=settings.save_steps, save_total_limit=2, seed=settings.seed,
        data_seed=settings.seed, report_to=[], use_cpu=not on_gpu, bf16=dtype == torch.bfloat16,
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=LABEL_IGNORE))
    card = TrainCard(job=job.name, base_model=job.model.name, data=str(data), synth_card=synth_card,
                     settings=asdict(settings), examples=len(train_set), eval_examples=len(eval_set or []),
                     device="gpu" if on_gpu else "cpu")
    checkpoint = last_checkpoint(output) if resume else None
    card.resumed_from = checkpoint
    if eval_set is not None and checkpoint is None:
        card.eval_loss_before = round(trainer.evaluate()["eval_loss"], 4)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    card.seconds = round(time.perf_counter() - started, 1)
    card.steps = result.global_step
    card.train_loss = round(result.training_loss, 4)
    card.losses = [{"step": h["step"], "loss": round(h["loss"], 4)} for h in trainer.state.log_history if "loss" in h]
    steps_run = result.global_step - (int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0)
    per_step = settings.batch_size * settings.gradient_accumulation
    mean_tokens = sum(len(x) for x in train_set["input_ids"]) / len(train_set)
    card.tokens = int(steps_run * per_step * mean_tokens)
    card.tokens_per_second = round(card.tokens / card.seconds, 1) if card.seconds else 0.0
    if eval_set is not None:
        card.eval_loss = round(trainer.evaluate()["eval_loss"], 4)
    model.save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
    (output / "train.json").write_text(json.dumps(asdict(card), indent=2) + "\n", encoding="utf-8")
    return card
