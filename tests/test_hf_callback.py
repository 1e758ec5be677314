"""The one-line Trainer form: ``Trainer(..., callbacks=[LdbCallback(ldbfx.DropBP, drop_rate=0.5)])``.

The model is captured from the first training batch as Trainer prepares it; the run must equal
the explicit form (transform, install, LdbCallback(gm, ...)) bit for bit with the same seed, keep
each dropped block's adapters and optimizer state unchanged in its steps, resume exactly, and
work with accumulation, bf16, torch.compile, a Trainer subclass and the user's config as it is.
"""

import copy

import pytest
import torch

import ldbfx
from ldbfx.errors import LdbfxError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from ldbfx.hf import LdbCallback  # noqa: E402

VOCAB, LAYERS = 64, 3


def llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=True,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def lora():
    return peft.get_peft_model(llama(), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], lora_dropout=0.0))


MODELS = {"lora": lora, "full": llama}


def dataset(n=32, length=16):
    rows = []
    for i in range(n):  # learnable: arithmetic progressions of tokens
        ids = (torch.arange(length) * (1 + i % 3) + i) % VOCAB
        rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": ids.clone()})
    return rows


def trainer(model, callbacks, out, cls=None, **options):
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=3e-3,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        **{"save_strategy": "no", "logging_steps": 4, **options})
    return (cls or transformers.Trainer)(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)


def explicit(model, bf16=False):
    """The explicit form's graph: captured under the Trainer's autocast, with a token count."""
    batch = {**torch.utils.data.default_collate(dataset()[:8]), "num_items_in_batch": torch.tensor(1.0)}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        gm = ldbfx.transform(model, example_kwargs=batch)
    ldbfx.install(model, gm)
    return gm


class Watch(transformers.TrainerCallback):
    """At every optimizer step: the masks drawn, and that the dropped blocks' parameters and their
    optimizer state did not move (their adapters, for LoRA)."""

    def __init__(self, ldb):
        self.ldb, self.draws, self.checked = ldb, {}, 0

    def _dropped(self, model):
        return [(n, p) for name in self.ldb.policy.dropped for n, p in
                model.get_submodule(name).named_parameters(prefix=name) if p.requires_grad]

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.optimizer = optimizer
        if self.ldb.policy is None:  # the one-line form captures at the first batch
            return
        self.draws[state.global_step + 1] = self.ldb.policy.dropped
        self.before = {n: (p.detach().clone(), copy.deepcopy(optimizer.state.get(p, {})))
                       for n, p in self._dropped(model)}

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.ldb.policy is None or not hasattr(self, "before"):
            return
        params = dict(model.named_parameters())
        for name, (value, opt_state) in self.before.items():
            assert torch.equal(params[name], value), name
            now = self.optimizer.state.get(params[name], {})
            assert set(now) == set(opt_state) and all(torch.equal(torch.as_tensor(now[k]), torch.as_tensor(v))
                                                      for k, v in opt_state.items()), name
        self.checked += len(self.before)


def run(kind, out, form="one-line", cls=None, resume=None, **options):
    model = MODELS[kind]()
    if form == "one-line":
        callback = LdbCallback(ldbfx.DropBP, drop_rate=0.5, seed=1)
    else:
        callback = LdbCallback(explicit(model, bf16=options.get("bf16", False)), ldbfx.DropBP, drop_rate=0.5, seed=1)
    watch = Watch(callback)
    run_trainer = trainer(model, [callback, watch], out, cls=cls, **options)
    run_trainer.train(resume_from_checkpoint=resume)
    return model, callback, watch, run_trainer


def _same_parameters(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


class SFTLike(transformers.Trainer):
    """Overrides what TRL's SFTTrainer overrides: compute_loss and training_step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.seen += 1
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        return super().training_step(model, inputs, num_items_in_batch)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_one_line_equals_the_explicit_form(kind, tmp_path):
    # LoRA in a Trainer subclass as TRL's SFTTrainer is (compute_loss, training_step overridden).
    cls = SFTLike if kind == "lora" else None
    model, callback, watch, run_trainer = run(kind, tmp_path / "one", cls=cls, use_cache=True)
    if cls is not None:
        assert run_trainer.seen == 8
    assert isinstance(callback.gm, ldbfx.LdbGraphModule)
    assert ldbfx.installed(model) is None and "forward" not in model.__dict__  # its own forward again
    assert model.config.use_cache is True  # left as the user (here: Trainer's use_cache) set it
    names = [b.name for b in ldbfx.branches(callback.gm)]
    assert len(names) == 2 * LAYERS
    stats = callback.policy.stats
    assert stats["steps"] == 8 and 0.2 < stats["actual_drop_rate"] < 0.8 and watch.checked > 0
    want_model, want_callback, want_watch, want_trainer = run(kind, tmp_path / "explicit", form="explicit")
    _same_parameters(model, want_model)
    assert watch.draws == {s: d for s, d in want_watch.draws.items() if s > 1}
    losses = [h["loss"] for h in run_trainer.state.log_history if "loss" in h]
    assert losses == [h["loss"] for h in want_trainer.state.log_history if "loss" in h]
    assert ldbfx.dropped_branches(callback.gm) == ()  # training ended: full backprop
    if kind == "lora":  # the adapters save and load as without ldbfx
        model.save_pretrained(tmp_path / "adapter")
        loaded = peft.PeftModel.from_pretrained(llama(), tmp_path / "adapter")
        _same_parameters(loaded, model)


def test_one_line_resumes_exactly(tmp_path):
    saving = {"save_strategy": "steps", "save_steps": 3}
    model, _, watch, _ = run("lora", tmp_path, **saving)
    for step in (3,):  # inside epoch 0 (4 steps an epoch): the capture must not begin it again
        again, _, resumed, _ = run("lora", tmp_path / "again", resume=str(tmp_path / f"checkpoint-{step}"), **saving)
        assert resumed.draws == {s: d for s, d in watch.draws.items() if s > step + 1}, step
        _same_parameters(again, model)


def test_one_line_with_accumulation_and_bf16_equals_the_explicit_form(tmp_path):
    options = {"gradient_accumulation_steps": 2, "bf16": True, "max_steps": 2}
    model, callback, _, _ = run("lora", tmp_path / "one", **options)
    assert "num_items_in_batch" in [n.target for n in callback.gm.graph.nodes if n.op == "placeholder"]
    # After training: the model's own forward, still beneath accelerate's autocast wrapper.
    assert ldbfx.installed(model) is None and "_original_forward" in model.__dict__
    want, _, _, _ = run("lora", tmp_path / "explicit", form="explicit", **options)
    _same_parameters(model, want)


def test_one_line_under_torch_compile(tmp_path):
    # Captured eagerly at the first batch (a graph break), compiled through the graph after it.
    torch._dynamo.reset()
    model, callback, watch, run_trainer = run("lora", tmp_path / "compiled", torch_compile=True,
                                               torch_compile_backend="eager", max_steps=2)
    assert run_trainer.state.global_step == 2
    assert callback.gm.ldbfx_state.branch_cut and watch.checked > 0  # the compiled gates split the graph
    torch._dynamo.reset()
    want, _, _, _ = run("lora", tmp_path / "eager", max_steps=2)
    got = dict(model.named_parameters())
    for name, p in want.named_parameters():  # Dynamo's graphs run the same ops; on their scale
        assert (got[name] - p).abs().max() <= 1e-5 * p.abs().max() + 1e-7, name


def test_sensitivity_allocation_runs_from_a_trainer_batch(tmp_path):
    model = lora()
    seen = {}

    class When(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.setdefault(callback.policy.allocation, state.global_step)

    callback = LdbCallback(ldbfx.DropBP, drop_rate=0.5, allocation="sensitivity", allocate_at=0.25)
    trainer(model, [callback, When()], tmp_path).train()
    policy = callback.policy
    assert policy.allocation == "sensitivity"
    assert set(policy.sensitivity) == {b.name for b in ldbfx.branches(callback.gm) if b.eligible}
    assert seen == {"uniform": 1, "sensitivity": 3}  # 8 steps: allocated in step 3 (after 2 = 25%)
    assert policy.stats["flop_weighted_rate"] == pytest.approx(0.5, abs=0.1)


def test_transform_options_pass_through_the_callback(tmp_path):
    model = lora()
    callback = LdbCallback(ldbfx.DropBP, drop_rate=0.5, keep_first_blocks=2, keep_last_blocks=0)
    trainer(model, [callback], tmp_path, max_steps=1).train()
    reasons = [b.reason for b in ldbfx.branches(callback.gm)]
    assert reasons == ["first 2 blocks"] * 4 + [""] * 2
    with pytest.raises(TypeError, match="already captured"):
        LdbCallback(callback.gm, ldbfx.DropBP, keep_first_blocks=2)


@pytest.mark.parametrize("hook", ["neftune", "input_require_grads"])
def test_hooks_the_graph_cannot_run_are_refused_before_training(hook, tmp_path):
    model = lora()
    options = {"neftune_noise_alpha": 5.0} if hook == "neftune" else {}
    if hook == "input_require_grads":
        model.enable_input_require_grads()
    run_trainer = trainer(model, [LdbCallback(ldbfx.DropBP)], tmp_path, **options)
    fix = "neftune_noise_alpha=None" if hook == "neftune" else "disable_input_require_grads"
    with pytest.raises(LdbfxError, match=fix):
        run_trainer.train()
    assert run_trainer.state.global_step == 0
    model(**torch.utils.data.default_collate(dataset()[:2])).loss.backward()  # its own forward: no capture
    assert ldbfx.installed(model) is None


def test_a_batch_the_capture_cannot_serve_names_the_fix(tmp_path):
    # Captured with static shapes, then a last batch of 4 rows (36 = 4 * 8 + 4).
    model = lora()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=1,
                                          report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    run_trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(36),
                                       callbacks=[LdbCallback(ldbfx.DropBP, dynamic_shapes=None)])
    with pytest.raises(LdbfxError, match="dynamic_shapes='auto'.*dataloader_drop_last=True"):
        run_trainer.train()
    assert run_trainer.state.global_step == 4


def test_quantized_base_weights_are_refused_with_what_to_do():
    model = llama()
    layer = model.model.layers[1].mlp.down_proj
    # bitsandbytes keeps 4-bit weights as uint8 parameters (Params4bit); torchao's NF4 as a tensor subclass.
    layer.weight = torch.nn.Parameter(torch.zeros(layer.weight.numel() // 2, 1, dtype=torch.uint8),
                                      requires_grad=False)
    layer.forward = lambda x: torch.nn.functional.linear(x, torch.zeros(32, 64))
    batch = torch.utils.data.default_collate(dataset()[:2])
    with pytest.raises(LdbfxError, match="quantized"):
        ldbfx.transform(model, example_kwargs=batch)


def test_one_line_under_torchrun_ddp(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).parent / "hf_ddp_worker.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(worker), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["dense"] and ranks[1]["dense"]  # DDP's forward turned dense gradients on
    # Each rank measured its own batch; the allocation averaged them: the same rates and masks.
    assert ranks[0]["rates"] == ranks[1]["rates"] and len(set(ranks[0]["rates"].values())) > 1
    assert ranks[0]["draws"] == ranks[1]["draws"] and ranks[0]["stats"]["allocation"] == "sensitivity"
    for name, value in ranks[0]["params"].items():  # DDP kept the replicas equal, dropped blocks too
        assert torch.equal(value, ranks[1]["params"][name]), name


def test_the_trainer_example_runs(capsys):
    import runpy
    from pathlib import Path

    example = Path(__file__).parent.parent / "examples" / "hf_trainer.py"
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out
    assert "'steps': 48" in out  # 4 epochs of 12 steps, each drawing a mask
    # The base model's branches under PEFT's names: layers 1 and 2 (the first and last are kept).
    assert "branches: ['base_model.model.model.layers.1.self_attn', 'base_model.model.model.layers.1.mlp', " \
           "'base_model.model.model.layers.2.self_attn', 'base_model.model.model.layers.2.mlp']" in out
