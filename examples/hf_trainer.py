"""DropBP inside Hugging Face's Trainer, on a tiny random Llama with LoRA and embedded data.

Runs on a CPU in about half a minute, with no download:

    pip install -e ".[hf]" && python examples/hf_trainer.py

The one ldbfx line is marked: a callback. It captures the model from the first training batch as
Trainer prepares it (device, autocast, token count), and drops half of the decoder layers'
attention and MLP branches at each step. The model stays a ``PeftModel`` over a
``LlamaForCausalLM``: Trainer, ``save_pretrained`` and ``generate`` act on it as usual.
"""

import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import ldbfx
from ldbfx.hf import LdbCallback

VOCAB, LENGTH = 64, 16


def dataset(n=96):
    """Arithmetic progressions of token ids: a language a tiny model learns in a few epochs."""
    rows = []
    for i in range(n):
        ids = (torch.arange(LENGTH) * (1 + i % 3) + i) % VOCAB
        rows.append({"input_ids": ids, "attention_mask": torch.ones(LENGTH, dtype=torch.long),
                     "labels": ids.clone()})
    return rows


def main():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0))
    data = dataset()

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=8, num_train_epochs=4,
                                 learning_rate=1e-2, logging_steps=12, report_to=[], use_cpu=True,
                                 save_strategy="no", disable_tqdm=True)  # drop use_cpu on a GPU
        callback = LdbCallback(ldbfx.DropBP, drop_rate=0.5)  # <- ldbfx
        Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
        model.save_pretrained(out)  # the trained adapters, under PEFT's own keys
    print("branches:", [b.name for b in ldbfx.branches(callback.gm) if b.eligible])
    print("policy:", callback.policy.stats)
    prompt = data[1]["input_ids"][:4].unsqueeze(0)
    print("prompt", prompt.tolist(), "->", model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False).tolist())


if __name__ == "__main__":
    main()
