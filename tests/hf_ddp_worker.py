"""One rank of the one-line Trainer form under torchrun (tests/test_hf_callback.py runs two).

Writes ``rank{N}.pt`` into the directory given: the final parameters, the masks drawn at each
step, the allocated rates and the policy's stats.
"""

import sys

import peft
import torch
import transformers

import ldbfx
from ldbfx.hf import LdbCallback


def main(out: str) -> None:
    torch.set_num_threads(1)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], lora_dropout=0.0))
    rows = [{"input_ids": (ids := (torch.arange(16) * (1 + i % 3) + i) % 64), "labels": ids.clone()}
            for i in range(32)]
    callback = LdbCallback(ldbfx.DropBP, drop_rate=0.5, allocation="sensitivity", allocate_at=0.25)
    draws = {}

    class Record(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if callback.policy is not None:
                draws[state.global_step + 1] = callback.policy.dropped

    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, num_train_epochs=2, learning_rate=3e-3, report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0, save_strategy="no", ddp_backend="gloo")
    transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback, Record()]).train()
    rank = torch.distributed.get_rank()
    torch.save({"params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                "draws": draws, "rates": callback.policy.rates, "stats": callback.policy.stats,
                "dense": callback.gm.ldbfx_state.dense}, f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
