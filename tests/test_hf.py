"""Hugging Face transformers through the torch.export front end (tiny random configs, no downloads).

The same contract as the FX front end (tests/contract.py): outputs bit for bit in train and eval
mode, shared parameters and state_dict keys, eligibility, FLOPs equal to freezing, kept gradients
equal to the frozen reference. Plus what Hugging Face users rely on: tied weights, changing
sequence lengths, install() with save_pretrained/generate, the Trainer callback, PEFT LoRA.
"""

import copy
import io
import math
import types

import pytest
import torch

import ldbfx

transformers = pytest.importorskip("transformers")

from contract import (  # noqa: E402
    assert_close_to_scale,
    check_eligibility,
    check_flops,
    check_gradients,
    check_optimizer,
    check_outputs,
    pick_dropped,
)

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


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    make_model, make_inputs = CASES[request.param]
    torch.manual_seed(0)
    model = make_model()
    inputs = make_inputs()
    gm = ldbfx.transform(model, example_kwargs=inputs)
    return request.param, model, gm, inputs


def exported(model, inputs):
    """The untransformed export of ``model`` in train mode (the same kernels as ldbfx's graph)."""
    model.train()
    return torch.export.export(model, (), {k: v.clone() for k, v in inputs.items()}, strict=False).module()


def test_contract(case):
    name, model, gm, inputs = case
    check_outputs(model, gm, inputs)  # dropout in BERT/ViT: same RNG draws, train and eval graphs
    check_eligibility(gm)
    assert list(gm.state_dict()) == list(model.state_dict())
    params = dict(model.named_parameters())
    assert all(params[n] is p for n, p in gm.named_parameters())
    modules = dict(model.named_modules())
    for layer in ldbfx.layers(gm):  # named by the model's own module paths
        assert layer.name in modules or layer.name in params, layer.name
    full, frozen, dropped = check_flops(model, gm, inputs, rel=0.0)
    assert dropped < full
    check_gradients(model, gm, inputs, pick_dropped(gm, 0.5), reference=exported(model, inputs))
    check_optimizer(model, gm, inputs, pick_dropped(gm, 0.5, seed=1),
                    lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1))


def test_projections_really_skip_their_weight_gradient(case):
    name, model, gm, inputs = case
    kinds = {l.name: l for l in ldbfx.layers(gm)}
    projections = [l for l in kinds.values() if l.kind in ("linear", "matmul") and l.eligible]
    assert len(projections) >= 7 and all(l.saves_compute for l in projections)  # attention, MLP


def test_tied_weights_are_one_layer(case):
    name, model, gm, inputs = case
    if name not in ("llama", "gpt2"):
        pytest.skip("no tied weights")
    embedding = "model.embed_tokens.weight" if name == "llama" else "transformer.wte.weight"
    layer = next(l for l in ldbfx.layers(gm) if embedding in l.params)
    assert layer.params == (embedding,) and layer.kind == "embedding+linear"
    assert not any(l.name == "lm_head" for l in ldbfx.layers(gm))


def test_compiled_path_functions_match_eager(case):
    # The autograd Functions torch.compile runs (mask read at backward), here without compiling:
    # kept gradients equal the eager path's to the gradient's scale, dropped ones are zero.
    name, model, gm, inputs = case
    drop = pick_dropped(gm, 0.5, seed=2)
    ldbfx.set_dropped(gm, drop)
    try:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        gm(**inputs).loss.backward()
        eager = {n: p.grad for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with ldbfx.ops.compiled_path():
            gm(**inputs).loss.backward()
    finally:
        ldbfx.set_dropped(gm, [])
    for n, p in model.named_parameters():
        if eager[n] is None:
            assert p.grad is None or not p.grad.any(), n
        else:
            assert_close_to_scale(p.grad, eager[n], what=n)


def test_aliased_example_inputs_are_not_merged():
    # labels=input_ids (the very same tensor) is how causal-LM batches are often built; export
    # would read one placeholder for both, and later batches with other labels would be wrong.
    model = llama()
    ids = tokens()["input_ids"]
    gm = ldbfx.transform(model, example_kwargs={"input_ids": ids, "labels": ids})
    other = tokens(seed=1)
    batch = {"input_ids": other["input_ids"], "labels": torch.roll(other["labels"], 1, dims=1)}
    model.eval(), gm.eval()
    assert torch.equal(gm(**batch).loss, model(**batch).loss)


def test_changing_shapes_need_no_new_capture():
    model = llama()
    gm = ldbfx.transform(model, example_kwargs=tokens(batch=2, length=16))
    ldbfx.set_dropped(gm, [l for l in ldbfx.layers(gm) if l.eligible][:3])
    for batch, length in ((4, 16), (2, 9), (3, 23)):  # the last smaller batch, shorter sequences
        inputs = tokens(batch, length, seed=length)
        torch.manual_seed(0)
        out = gm(**inputs)
        out.loss.backward()
        assert out.logits.shape == (batch, length, VOCAB)
        model.eval(), gm.eval()
        assert torch.equal(gm(**inputs).logits, model(**inputs).logits)
        model.train(), gm.train()


def test_static_shapes_refuse_other_shapes():
    model = llama()
    gm = ldbfx.transform(model, example_kwargs=tokens(), dynamic_shapes=None)
    with pytest.raises(Exception, match="(?i)guard|shape|size"):
        gm(**tokens(length=9))


@pytest.mark.slow
def test_compiled_once_over_masks_and_sequence_lengths():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = llama(layers=1)
    gm = ldbfx.transform(model, example_kwargs=tokens(), keep_first=1)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(gm, backend=counter, fullgraph=True, dynamic=True)
    eligible = [l for l in ldbfx.layers(gm) if l.eligible]
    params = dict(model.named_parameters())
    for drop, length in ((eligible[:3], 16), (eligible[3:], 16), ([], 12), (eligible[::2], 9)):
        ldbfx.set_dropped(gm, drop)
        inputs = tokens(length=length, seed=length)
        model.zero_grad(set_to_none=True)
        compiled(**inputs).loss.backward()
        got = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        gm(**inputs).loss.backward()  # eager reference with the same mask
        for name, p in params.items():
            if any(name in l.params for l in drop):
                assert not got[name].any() and p.grad is None, name
            else:  # compiled and eager kernels round differently: the gradient's scale
                assert (got[name] - p.grad).abs().max() <= 2e-3 * p.grad.abs().max() + 1e-6, name
    assert counter.frame_count == 1, "changing the mask or the sequence length must not recompile"
    # Trainer(torch_compile=True) compiles the model itself: through the installed forward
    # (positional inputs bound by name) into gm's graph, in one graph, once.
    ldbfx.install(model, gm)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for drop in (eligible[:3], eligible[3:]):
        ldbfx.set_dropped(gm, drop)
        inputs = tokens(seed=len(drop))
        model.zero_grad(set_to_none=True)
        gm(**inputs).loss.backward()
        want = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        compiled(inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"]).loss.backward()
        before = {n: p.detach().clone() for n, p in params.items()}
        for name, grad in want.items():  # the same tolerance as above
            assert (params[name].grad - grad).abs().max() <= 2e-3 * grad.abs().max() + 1e-6, name
        optimizer.step()
        for name in (n for l in drop for n in l.params):  # zeros from the compiled kernels: skipped
            assert torch.equal(params[name], before[name]), name
    assert counter.frame_count == 1
    ldbfx.uninstall(model)
    torch._dynamo.reset()


def _checkpointing_switches(model):
    """Hugging Face's activation-checkpointing switches, the current name first: a 5.x release
    after 5.0 renamed gradient_checkpointing_enable (a deprecated alias in 5.23 and 5.24)."""
    names = ("activation_checkpointing_enable", "gradient_checkpointing_enable")
    return [getattr(model, name) for name in names if hasattr(model, name)]


def test_a_model_with_use_cache_on_is_captured_without_a_cache_and_keeps_its_config():
    # A training graph returns no cache: the capture turns it off and restores the user's config.
    model = llama()
    model.config.use_cache = True  # a DynamicCache, which export cannot return
    gm = ldbfx.transform(model, example_kwargs=tokens())
    assert model.config.use_cache is True
    out = gm(**tokens())
    assert getattr(out, "past_key_values", None) is None
    ldbfx.install(model, gm)  # not "config values changed: use_cache"
    model.config.use_cache = False
    from ldbfx.install import check_unchanged
    check_unchanged(model, gm)  # toggling it afterwards changes nothing the graph computes
    ldbfx.uninstall(model)
    with pytest.raises(ldbfx.TraceError, match="use_cache out of the example batch"):
        ldbfx.transform(llama(), example_kwargs={**tokens(), "use_cache": True})


def test_export_errors_name_the_fix():
    model = llama()
    _checkpointing_switches(model)[0]()
    with pytest.raises(ldbfx.TraceError, match=r"activation_checkpointing_disable\(\) \(gradient_checkpointing_disable"):
        ldbfx.transform(model, example_kwargs=tokens())
    model = llama()
    model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: None)
    with pytest.raises(ldbfx.TraceError, match="model.layers.0.mlp have forward or backward hooks"):
        ldbfx.transform(model, example_kwargs=tokens())
    with pytest.raises(TypeError, match="leaf_modules.*torch.export"):
        ldbfx.transform(llama(), example_kwargs=tokens(), leaf_modules=[torch.nn.Linear])


def test_fx_failure_suggests_an_example_batch():
    with pytest.raises(ldbfx.TraceError, match="example_kwargs"):
        ldbfx.transform(llama())  # HF models no longer trace with torch.fx (transformers v5)


def test_summary_and_inspection_on_exported_models():
    model = bert()
    inputs = CASES["bert"][1]()
    gm = ldbfx.transform(model, example_kwargs=inputs)
    text = ldbfx.summary(gm, print_fn=lambda s: None, **inputs)  # with the FLOP column
    row = next(line for line in text.splitlines() if "bert.encoder.layer.0.attention.self.query " in line)
    assert row.split()[-1].endswith("%") and float(row.split()[-1][:-1]) > 0
    report = ldbfx.inspect.weight_grad_flops(gm, **inputs)
    eligible = [l for l in ldbfx.layers(gm) if l.eligible]
    full, frozen, _ = check_flops(model, gm, inputs, rel=0.0)
    # Dropping every eligible layer skips exactly the dW FLOPs the report attributes to them.
    assert full - frozen == sum(report.weight_grad[l.index] for l in eligible)
    graph = ldbfx.to_networkx(gm)
    assert graph.number_of_nodes() == len(ldbfx.layers(gm))


# ------------------------------------------------------------------------------------------
# The model object: install(), save_pretrained, generate, deepcopy
# ------------------------------------------------------------------------------------------
def test_install_trains_through_the_graph_and_keeps_the_model(tmp_path):
    model = llama()
    gm = ldbfx.transform(model, example_kwargs=tokens())
    assert ldbfx.install(model, gm) is model and ldbfx.installed(model) is gm
    drop = [l for l in ldbfx.layers(gm) if l.eligible][:4]
    ldbfx.set_dropped(gm, drop)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for l in drop for n in l.params}
    model(**tokens()).loss.backward()
    opt.step()
    for name, value in before.items():
        assert params[name].grad is None and torch.equal(params[name], value), name
    assert not torch.equal(params["model.norm.weight"], torch.ones_like(params["model.norm.weight"]))

    model.save_pretrained(tmp_path)  # the trained weights, under the model's own keys
    loaded = type(model).from_pretrained(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name

    prompt = tokens()["input_ids"][:1, :4]  # generate: no gradients, the original forward (KV cache)
    with torch.no_grad():
        model.eval()
        assert model.generate(prompt, max_new_tokens=3, do_sample=False).shape == (1, 7)
    model.train()
    with pytest.raises(ldbfx.LdbfxError, match="example batch"):
        model(input_ids=prompt, token_type_ids=prompt)  # an input the graph was not captured with
    for switch in _checkpointing_switches(model):
        with pytest.raises(ldbfx.LdbfxError, match="gradient checkpointing"):
            switch()

    copied = copy.deepcopy(model)  # routes to a copy of the graph over the copy's own modules
    assert ldbfx.installed(copied) is not gm
    assert ldbfx.installed(copied).get_parameter("lm_head.weight") is copied.lm_head.weight
    from ldbfx.install import check_unchanged

    # save_pretrained wrote config metadata (architectures, dtype), which changes no forward;
    # the copy has its own capture record, without the graph's own modules
    check_unchanged(model, gm)
    check_unchanged(copied, ldbfx.installed(copied))
    ldbfx.uninstall(model)
    assert ldbfx.installed(model) is None and "forward" not in model.__dict__


def test_installed_graph_follows_the_models_mode():
    # BERT has dropout: its train and eval graphs differ. model.eval() must select the eval graph
    # for a call with gradients (which runs gm), or dropout would silently stay on.
    model = bert()
    inputs = CASES["bert"][1]()
    gm = ldbfx.transform(model, example_kwargs=inputs)
    ldbfx.install(model, gm)
    model.eval()
    with torch.no_grad():
        want = model(**inputs).logits  # the model's own forward, eval mode
    got = model(**inputs).logits  # gradients on: through gm
    assert got.requires_grad and torch.equal(got.detach(), want)
    model.train()
    torch.manual_seed(0)
    train = model(**inputs).logits
    assert not torch.equal(train.detach(), want)  # dropout on again


def test_install_refuses_a_graph_of_another_model():
    gm = ldbfx.transform(llama(), example_kwargs=tokens())
    with pytest.raises(ldbfx.LdbfxError, match="not transformed from this model"):
        ldbfx.install(llama(), gm)


# ------------------------------------------------------------------------------------------
# Trainer callback
# ------------------------------------------------------------------------------------------
def _dataset(n=48, length=16):
    rows = []
    for i in range(n):  # learnable: arithmetic progressions of tokens
        ids = (torch.arange(length) * (1 + i % 3) + i) % VOCAB
        rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long),
                     "labels": ids.clone()})
    return rows


def _trainer(model, callbacks, out, epochs=3, evaluate=False, **options):
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, num_train_epochs=epochs,
        learning_rate=3e-3, logging_steps=6, report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0, **{"save_strategy": "no", **options})
    return transformers.Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=callbacks,
                                eval_dataset=_dataset()[:8] if evaluate else None)


class _DroppedStayUnchanged(transformers.TrainerCallback):
    """Checks, at every optimizer step, that the layers dropped for it did not move."""

    def __init__(self, ldb_callback, model):
        self.ldb, self.params, self.checked = ldb_callback, dict(model.named_parameters()), 0

    def on_step_begin(self, args, state, control, **kwargs):
        names = [p for l in ldbfx.layers(self.ldb.gm) if l.name in self.ldb.policy.dropped for p in l.params]
        self.before = {n: self.params[n].detach().clone() for n in names}

    def on_optimizer_step(self, args, state, control, **kwargs):
        for name, value in self.before.items():
            assert torch.equal(self.params[name], value), name
        self.checked += len(self.before)


def test_trainer_callback_runs_layer_dropback(tmp_path):
    from ldbfx.hf import LdbCallback

    torch.manual_seed(0)
    model = llama()
    gm = ldbfx.transform(model, example_kwargs={k: v[:2] for k, v in
                                                 torch.utils.data.default_collate(_dataset()[:2]).items()})
    ldbfx.install(model, gm)
    callback = LdbCallback(gm, ldbfx.LayerDropBack, drop_rate=0.5, period=1, kappa=1)
    checker = _DroppedStayUnchanged(callback, model)
    trainer = _trainer(model, [callback, checker], tmp_path)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0], losses
    stats = callback.policy.stats
    assert stats["steps_full"] == 6 and stats["steps_drop"] == 12  # epoch 0 full, 1 and 2 DROP
    assert 0.3 < stats["actual_drop_rate"] < 0.7 and checker.checked > 0
    assert ldbfx.dropped(gm) == ()  # training ended: full backprop restored


class _DrawRecorder(transformers.TrainerCallback):
    def __init__(self, ldb_callback):
        self.ldb, self.draws = ldb_callback, {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.draws[state.global_step + 1] = self.ldb.policy.dropped_indices


def test_trainer_resume_continues_the_policys_draws(tmp_path):
    # LdbCallback kept no state in Trainer's checkpoints: a resumed run drew afresh, other layers
    # than the uninterrupted run. Its state now travels in trainer_state.json.
    from ldbfx.hf import STATE_KEY, LdbCallback

    def run(out, resume=None, evaluate=False, **options):
        torch.manual_seed(0)
        model = llama()
        gm = ldbfx.transform(model, example_kwargs=torch.utils.data.default_collate(_dataset()[:2]))
        ldbfx.install(model, gm)
        callback = LdbCallback(gm, ldbfx.LayerDropBack, drop_rate=0.5, period=1, kappa=1)
        recorder = _DrawRecorder(callback)
        _trainer(model, [callback, recorder], out, evaluate=evaluate, **options).train(resume_from_checkpoint=resume)
        return recorder.draws

    # 6 steps per epoch; epoch 0 full, 1 and 2 DROP (one draw per step)
    want = run(tmp_path, save_strategy="steps", save_steps=3)
    assert len(set(want.values())) > 5
    for step in (9, 12):  # mid-epoch 1; the end of epoch 1, whose on_epoch_end Trainer does not replay
        got = run(tmp_path / "again", resume=str(tmp_path / f"checkpoint-{step}"))
        assert got == {s: d for s, d in want.items() if s > step}, step
    # Saved by epoch: the state is taken after the epoch's end.
    assert run(tmp_path / "epochs", save_strategy="epoch") == want
    got = run(tmp_path / "again", resume=str(tmp_path / "epochs" / "checkpoint-12"))
    assert got == {s: d for s, d in want.items() if s > 12}
    # save_strategy="best" decides to save after evaluating: the state is taken there.
    best = {"save_strategy": "best", "eval_strategy": "steps", "eval_steps": 4, "metric_for_best_model": "loss"}
    assert run(tmp_path / "best", evaluate=True, **best) == want
    saved = max(s for p in (tmp_path / "best").glob("checkpoint-*") if (s := int(p.name.split("-")[1])) < 18)
    got = run(tmp_path / "again", resume=str(tmp_path / "best" / f"checkpoint-{saved}"), evaluate=True, **best)
    assert got == {s: d for s, d in want.items() if s > saved}
    # A checkpoint without the state (an older ldbfx): resumed, with a warning.
    saved = tmp_path / "checkpoint-15" / "trainer_state.json"
    saved.write_text(saved.read_text().replace(STATE_KEY, "removed"))
    with pytest.warns(UserWarning, match="without LdbCallback's state"):
        run(tmp_path / "again", resume=str(tmp_path / "checkpoint-15"))


def test_trainer_callback_runs_channel_dropback(tmp_path):
    from ldbfx.hf import LdbCallback

    torch.manual_seed(0)
    model = llama()
    gm = ldbfx.transform(model, example_kwargs=tokens())
    ldbfx.install(model, gm)
    callback = LdbCallback(gm, ldbfx.ChannelDropBack, channel_rate=0.5, seed=0)
    trainer = _trainer(model, [callback], tmp_path, epochs=2)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0], losses
    stats = callback.policy.stats
    assert stats["steps"] == 12 and stats["layers_per_step"] == 1 and 0.4 < stats["actual_channel_rate"] < 0.6


def test_trainer_callback_refuses_what_it_cannot_do(tmp_path):
    from ldbfx.hf import LdbCallback

    model = llama()
    gm = ldbfx.transform(model, example_kwargs=tokens())
    with pytest.raises(ldbfx.LdbfxError, match="kappa=1"):
        LdbCallback(gm, ldbfx.LayerDropBack)  # default kappa=2: larger DROP batches
    callback = LdbCallback(gm, ldbfx.LayerDropBack, kappa=1)
    with pytest.raises(ldbfx.LdbfxError, match="ldbfx.install"):  # not installed: silently full
        _trainer(model, [callback], tmp_path, epochs=1).train()


def test_trainer_keeps_the_columns_the_graph_lacks_and_the_call_refuses_them(tmp_path):
    # Captured without attention_mask, which the dataset has: Trainer keeps the columns the
    # model's own forward takes (as without ldbfx), and the call names the missing input, where
    # dropping the column would have trained without the mask silently.
    from ldbfx.hf import LdbCallback

    model = llama()
    gm = ldbfx.transform(model, example_kwargs={k: v for k, v in tokens().items() if k != "attention_mask"})
    ldbfx.install(model, gm)
    callback = LdbCallback(gm, ldbfx.LayerDropBack, kappa=1)
    with pytest.raises(ldbfx.LdbfxError, match=r"inputs \['attention_mask', 'input_ids', 'labels'\].*example batch"):
        _trainer(model, [callback], tmp_path, epochs=1).train()


def test_changes_the_graph_would_not_follow_are_refused(tmp_path):
    # After capture the graph cannot follow a replaced module, a new hook or a changed config
    # value: install and the Trainer callback name them instead of training without them.
    from ldbfx.hf import LdbCallback

    def captured():
        torch.manual_seed(0)
        model = llama(tied=False)
        return model, ldbfx.transform(model, example_kwargs=tokens())

    model, gm = captured()
    model.resize_token_embeddings(VOCAB + 8)  # a new embedding and lm_head
    with pytest.raises(ldbfx.LdbfxError, match="modules replaced: lm_head; parameters replaced or resized: "
                                               "model.embed_tokens.weight, lm_head.weight; config values changed: vocab_size"):
        ldbfx.install(model, gm)
    model, gm = captured()
    model.config.pad_token_id = 3  # what Trainer's token alignment does
    with pytest.raises(ldbfx.LdbfxError, match="config values changed: pad_token_id"):
        ldbfx.install(model, gm)
    model, gm = captured()
    ldbfx.install(model, gm)
    # NEFTune: Trainer hooks the input embeddings inside train(), after install
    trainer = _trainer(model, [LdbCallback(gm, ldbfx.LayerDropBack, kappa=1)], tmp_path, epochs=1,
                       neftune_noise_alpha=5.0)
    with pytest.raises(ldbfx.LdbfxError, match="hooks added to model.embed_tokens"):
        trainer.train()


def test_autocast_needs_a_capture_under_the_same_autocast():
    # An exported graph fixes the dtypes it saw: captured without autocast, it failed under one
    # with torch.export's "Tensor dtype mismatch". It now says what to do, and a graph captured
    # under bf16 autocast trains like the model does under it.
    def run(model, autocast):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(**tokens())[0].backward()
        return {n: p.grad for n, p in model.named_parameters()}

    torch.manual_seed(0)
    want = run(llama(layers=2), True)
    torch.manual_seed(0)
    model = llama(layers=2)
    ldbfx.install(model, ldbfx.transform(model, example_kwargs=tokens()))
    with pytest.raises(ldbfx.LdbfxError, match=r"captured by torch.export under no autocast and now runs "
                                               r"under autocast \(cpu bfloat16\)"):
        run(model, True)
    ldbfx.uninstall(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ldbfx.install(model, ldbfx.transform(model, example_kwargs=tokens()))
    got = run(model, True)
    for name, grad in got.items():
        # bf16 keeps 8 bits of mantissa: the graph's kernels may round differently from eager's
        assert (grad.float() - want[name].float()).abs().max() <= 3e-2 * want[name].float().abs().max() + 1e-3, name
    with pytest.raises(ldbfx.LdbfxError, match="now runs under no autocast"):
        run(model, False)


def test_accumulated_loss_is_averaged_per_token_when_captured_with_num_items(tmp_path):
    # With gradient accumulation a plain Trainer run hands the model num_items_in_batch, and the
    # loss is averaged per token over the accumulated batch. The graph took no such input, so
    # Trainer silently averaged per micro-batch: another gradient wherever micro-batches hold
    # different numbers of label tokens. Captured with it, one accumulated step matches the plain
    # run; captured without, it still differs, and the callback says so.
    from ldbfx.hf import LdbCallback

    rows = _dataset(8)
    for i, row in enumerate(rows):
        row["labels"][16 - 3 * i:] = -100  # 0 to 12 padded label tokens: unequal micro-batches

    def step(capture):
        torch.manual_seed(0)
        model = llama(tied=False, layers=1)
        callbacks = []
        if capture is not None:
            example = {k: v.clone() for k, v in torch.utils.data.default_collate(rows[:2]).items()}
            gm = ldbfx.transform(model, example_kwargs={**example, **capture})
            ldbfx.install(model, gm)
            callbacks = [LdbCallback(gm, ldbfx.LayerDropBack, drop_rate=0.5, period=2, kappa=1)]  # epoch 0: full
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0,
            report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
        transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks).train()
        return {n: before[n] - p.detach() for n, p in model.named_parameters()}  # the gradient

    want = step(None)
    got = step({"num_items_in_batch": torch.tensor(1.0)})
    for name, grad in want.items():
        assert_close_to_scale(got[name], grad, what=name)  # the export's kernels vs eager's
    with pytest.warns(UserWarning, match="averages the loss per micro-batch"):
        old = step({})
    name = "lm_head.weight"
    differ = (old[name] - want[name]).abs().max() / want[name].abs().max()
    assert differ > 1e-2, differ  # far outside the bound above: the normalisation differs
    # A model that takes no loss kwargs is never handed the count by Trainer: refused at install.
    model = llama(tied=False, layers=1)
    example = torch.utils.data.default_collate(rows[:2])
    gm = ldbfx.transform(model, example_kwargs={**example, "num_items_in_batch": torch.tensor(3.0)})
    model.accepts_loss_kwargs = False  # as ConvNext and Gemma3 declare
    with pytest.raises(ldbfx.LdbfxError, match="Trainer never passes it"):
        ldbfx.install(model, gm)
    # A count captured as an integer would truncate Trainer's float count (divided per device).
    model = llama(tied=False, layers=1)
    example = torch.utils.data.default_collate(rows[:2])
    ldbfx.install(model, ldbfx.transform(model, example_kwargs={**example, "num_items_in_batch": torch.tensor(3)}))
    with pytest.raises(ldbfx.LdbfxError, match="would truncate it: capture with a float count"):
        model(**example, num_items_in_batch=torch.tensor(2.5))


def test_trainer_bf16_trains_through_the_graph(tmp_path):
    # Trainer(bf16=True) has accelerate wrap model.forward in autocast, keeping ours as
    # model._original_forward: the callback took that for "not installed" and refused to start.
    from ldbfx.hf import LdbCallback

    torch.manual_seed(0)
    model = llama()
    example = torch.utils.data.default_collate(_dataset()[:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the autocast Trainer will train under
        gm = ldbfx.transform(model, example_kwargs=example)
    ldbfx.install(model, gm)
    callback = LdbCallback(gm, ldbfx.LayerDropBack, drop_rate=0.5, period=1, kappa=1)
    checker = _DroppedStayUnchanged(callback, model)
    trainer = _trainer(model, [callback, checker], tmp_path, epochs=2, bf16=True)
    trainer.train()
    assert model.__dict__["forward"] is not model.__dict__["_original_forward"]  # accelerate's wrapper
    assert callback.policy.stats["steps_drop"] == 6 and checker.checked > 0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(l) for l in losses), losses
    # accelerate's wrapper stays on the model after train(): uninstall removes it with ours (it
    # left it, so installed() still answered gm and a new install was refused)
    ldbfx.uninstall(model)
    assert ldbfx.installed(model) is None
    assert "forward" not in model.__dict__ and "_original_forward" not in model.__dict__
    model.zero_grad(set_to_none=True)
    model(**example).loss.backward()  # the model's own forward again: every layer has its gradient
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    ldbfx.install(model, gm)


def test_positional_inputs_reach_the_inputs_they_name():
    # torch.export orders the graph's inputs as the example batch's keys; the model's forward has
    # its own order. A positional call went in the graph's order: here the attention mask got the
    # token ids and the ids the mask, silently.
    model = bert()
    inputs = CASES["bert"][1]()
    inputs["attention_mask"][1, 10:] = 0  # padding, so a swapped mask changes the result
    gm = ldbfx.transform(model, example_kwargs={k: inputs[k] for k in ("attention_mask", "input_ids")})
    ldbfx.install(model, gm)
    model.eval()
    with torch.no_grad():
        want = model(inputs["input_ids"], inputs["attention_mask"]).logits  # the model's own forward
    got = model(inputs["input_ids"], inputs["attention_mask"]).logits  # gradients on: through gm
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), want)  # same ops, same order: exact up to kernels
    by_keyword = model(attention_mask=inputs["attention_mask"], input_ids=inputs["input_ids"]).logits
    torch.testing.assert_close(by_keyword.detach(), want)
    # An input the model takes in **kwargs (Trainer's token count) keeps positional inputs by name.
    ldbfx.uninstall(model)
    counted = {"attention_mask": inputs["attention_mask"], "input_ids": inputs["input_ids"],
               "num_items_in_batch": torch.tensor(1.0)}
    ldbfx.install(model, ldbfx.transform(model, example_kwargs=counted))
    got = model(inputs["input_ids"], inputs["attention_mask"], num_items_in_batch=torch.tensor(2.0)).logits
    torch.testing.assert_close(got.detach(), want)
    with pytest.raises(ldbfx.LdbfxError, match="cannot take") as refused:
        model(inputs["input_ids"], num_items_in_batch=torch.tensor(2.0))  # no mask: not a labels hint
    assert "attention_mask" in str(refused.value) and "leaves out labels" not in str(refused.value)
    with pytest.raises(ldbfx.LdbfxError, match="cannot take") as refused:  # labels it was not captured with
        model(inputs["input_ids"], inputs["attention_mask"], labels=inputs["labels"], num_items_in_batch=torch.tensor(2.0))
    assert "unexpected keyword argument 'labels'" in str(refused.value) and "leaves out labels" not in str(refused.value)
    ldbfx.uninstall(model)
    ldbfx.install(model, ldbfx.transform(model, example_kwargs=inputs))  # with labels
    with pytest.raises(ldbfx.LdbfxError, match="labels.*capture without them"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])  # Trainer's label smoothing
    with pytest.raises(ldbfx.LdbfxError, match="cannot be pickled.*state_dict"):
        torch.save(model, io.BytesIO())


@pytest.mark.parametrize("captured_with", ["padding", "no padding"])
def test_padded_batches_match_the_model(captured_with):
    # Most tests' attention masks are all ones; with padding, the graph must mask as the model
    # does, also when the example batch had none (a model that took "all ones" for "no mask" at
    # capture would ignore later padding, silently).
    model = llama(layers=2)
    inputs = tokens()
    inputs["attention_mask"][0, 12:] = 0
    inputs["labels"][0, 12:] = -100
    example = inputs if captured_with == "padding" else tokens()
    assert example["attention_mask"][0, 12:].any() == (captured_with == "no padding")
    ldbfx.install(model, ldbfx.transform(model, example_kwargs=example))
    model.eval()  # no dropout: the two forwards must agree
    unpadded = {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])}
    with torch.no_grad():  # the model's own forward
        want, want_unpadded = model(**inputs).logits, model(**unpadded).logits
    assert not torch.allclose(want_unpadded, want)  # the mask matters here
    torch.testing.assert_close(model(**inputs).logits.detach(), want)  # through the graph
    torch.testing.assert_close(model(**unpadded).logits.detach(), want_unpadded)


def test_trainer_callback_refuses_data_parallel(tmp_path):
    # Trainer wraps a model in nn.DataParallel when one process sees several GPUs: the replicas
    # would all call the one installed forward over the first GPU's modules.
    from ldbfx.hf import LdbCallback

    model = llama()
    gm = ldbfx.transform(model, example_kwargs=tokens())
    ldbfx.install(model, gm)
    callback = LdbCallback(gm, ldbfx.LayerDropBack, kappa=1)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[])
    assert args.n_gpu == 0  # sets the devices up; then as if this process saw two GPUs
    args._n_gpu = 2
    assert args.parallel_mode == transformers.training_args.ParallelMode.NOT_DISTRIBUTED  # Trainer's own reading
    state = transformers.TrainerState()
    with pytest.raises(ldbfx.LdbfxError, match="torchrun"):
        callback.on_train_begin(args, state, transformers.TrainerControl(), model=model)
    args = types.SimpleNamespace(n_gpu=1, parallel_mode=transformers.training_args.ParallelMode.DISTRIBUTED)  # DDP: one GPU per process
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    callback.on_train_begin(args, state, transformers.TrainerControl(), model=model, optimizer=optimizer)
    assert callback.policy is not None


def test_trainer_callback_discards_the_record_of_a_skipped_step():
    # Under fp16, accelerate's optimizer reports a step GradScaler skipped (inf/NaN): the
    # callback must then forget what that backward skipped, else the next step leaves those
    # layers untouched too. A step that ran has cleared the record itself.
    from accelerate.optimizer import AcceleratedOptimizer

    from ldbfx.hf import LdbCallback

    assert isinstance(getattr(AcceleratedOptimizer, "step_was_skipped", None), property)
    model = llama()
    gm = ldbfx.transform(model, example_kwargs=tokens())
    ldbfx.install(model, gm)
    callback = LdbCallback(gm, ldbfx.LayerDropBack, drop_rate=0.5, period=1, kappa=1, seed=0)
    state = transformers.TrainerState()
    callback.on_train_begin(None, state, None, model=model,
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    callback.on_epoch_begin(None, state, None)
    for skipped in (False, True):
        ldbfx.set_dropped(gm, [l.name for l in ldbfx.layers(gm) if l.eligible][:2])
        model(**tokens())[0].float().sum().backward()
        assert gm.ldbfx_state.skipped
        callback.on_step_end(None, state, None, optimizer=types.SimpleNamespace(step_was_skipped=skipped))
        assert bool(gm.ldbfx_state.skipped) != skipped, skipped
        gm.ldbfx_state.discard_skipped()
        model.zero_grad()


# ------------------------------------------------------------------------------------------
# PEFT
# ------------------------------------------------------------------------------------------
def test_peft_lora_adapters_are_the_layers():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(llama(tied=False, layers=2), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    inputs = tokens()
    gm = ldbfx.transform(model, example_kwargs=inputs)
    layers = ldbfx.layers(gm)
    check_eligibility(gm)
    assert all(("lora_" in l.name) == (l.reason != "frozen") for l in layers)
    assert sum(l.eligible for l in layers) == 8 - 4 - 1
    check_gradients(model, gm, inputs, pick_dropped(gm, 0.5), reference=exported(model, inputs))
    ldbfx.install(model, gm)
    drop = [l for l in layers if l.eligible][:2]
    ldbfx.set_dropped(gm, drop)
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    for name, p in model.named_parameters():
        dropped = any(name in l.params for l in drop)
        assert (p.grad is None) == (dropped or not p.requires_grad), name


def test_cli_inspects_a_tiny_hugging_face_model(capsys):
    from ldbfx.cli import main

    assert main(["inspect", "hf:gpt2"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[1:2] == ["transformer.h.1.mlp.c_fc"])
    assert "addmm" in row and "yes" in row  # GPT-2's Conv1D: an eligible layer that saves dW
    assert main(["inspect", "hf:no_such_model"]) == 2
    assert "unknown Hugging Face model type" in capsys.readouterr().err


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
