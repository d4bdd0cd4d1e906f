"""Build a tiny random-weight Llama with a byte-level BPE tokenizer and a ChatML template (seconds, ~2 MB).

Answers from it are noise, which is the point for plumbing tests: only the grammar makes them parse.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "Discharge summary. Past medical history: atrial fibrillation, hypertension, diabetes mellitus type 2.",
    "Labs: creatinine 1.4 mg/dL, hemoglobin 10.2 g/dL, platelets 145 K/uL, AST 32 U/L, total bilirubin 0.8.",
    '{"evidence": "Cr 2.7", "value": "2.7", "unit": "mg/dL"} {"evidence": "", "answer": "not_in_note"}',
    "The patient denies chest pain. No history of stroke or TIA. LVEF 35%. CHADS2 score 3. glucose 180 mmol/L umol/L",
]


def build_tiny_model(target: Path, vocab_size: int = 512, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    target.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(target)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32,  # vLLM CPU attention has no head_dim 16 kernel
        max_position_embeddings=8192, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(target, safe_serialization=True)
    return target
