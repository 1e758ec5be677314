"""Tiny random Hugging Face models and batches for the tests/test_hf_*.py files (no downloads).

Imported after ``pytest.importorskip("transformers")`` in each test module.
"""

import torch
import transformers


VOCAB = 64


def llama(tied: bool = True, layers: int = 1):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
        tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config)


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     use_cache=False)
    return transformers.GPT2LMHeadModel(config)  # Conv1D (addmm), lm_head tied to wte


def bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def vit():
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3)
    return transformers.ViTForImageClassification(config)


def tokens(batch=2, length=16, seed=0):
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


CASES = {
    "llama": (lambda: llama(layers=2), lambda: tokens()),
    "gpt2": (gpt2, lambda: tokens()),
    "bert": (bert, lambda: {**tokens(), "labels": torch.tensor([0, 2])}),
    "vit": (vit, lambda: {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 2])}),
}


def _checkpointing_switches(model):
    """Hugging Face's activation-checkpointing switches, the current name first: a 5.x release
    after 5.0 renamed gradient_checkpointing_enable (a deprecated alias in 5.23 and 5.24)."""
    names = ("activation_checkpointing_enable", "gradient_checkpointing_enable")
    return [getattr(model, name) for name in names if hasattr(model, name)]
