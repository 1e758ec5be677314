"""LayerDropBack inside Hugging Face's Trainer, on a tiny random Llama and embedded data.

Runs on a CPU in about half a minute, with no download:

    pip install -e ".[hf]" && python examples/hf_trainer.py

The three ldbfx lines are marked. The model stays a ``LlamaForCausalLM``: Trainer,
``save_pretrained`` and ``generate`` act on it as usual.
"""

import tempfile

import torch
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
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_cache=False))  # a KV cache is for generation; training returns none
    data = dataset()

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=8, num_train_epochs=4,
                                 learning_rate=3e-3, logging_steps=12, report_to=[], use_cpu=True,
                                 save_strategy="no", disable_tqdm=True)  # drop use_cpu on a GPU
        # The capture fixes the device: move the model and the example batch there first.
        model.to(args.device)
        example = {k: v.to(args.device) for k, v in torch.utils.data.default_collate(data[:2]).items()}

        gm = ldbfx.transform(model, example_kwargs=example)  # 1. capture once (torch.export)
        ldbfx.install(model, gm)  # 2. model.forward now trains through the rewritten graph
        callback = LdbCallback(gm, ldbfx.LayerDropBack, drop_rate=0.3, period=2, kappa=1)  # 3.
        Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
        model.save_pretrained(out)  # the trained weights, under the model's own keys
    print("policy:", callback.policy.stats)
    prompt = data[1]["input_ids"][:4].unsqueeze(0)
    print("prompt", prompt.tolist(), "->", model.generate(prompt, max_new_tokens=6, do_sample=False).tolist())


if __name__ == "__main__":
    main()
