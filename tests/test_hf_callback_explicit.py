"""The explicit Trainer form: ``LdbCallback(gm, policy, ...)`` with a graph you captured and installed.

LayerDropBack and ChannelDropBack train through the graph in ``Trainer`` (dropped layers stay
unchanged), resume continues the policy's draws, gradient accumulation averages per token with
``num_items_in_batch``, ``bf16`` works through accelerate's wrapper, and what the callback cannot
do (kappa != 1, not installed, missing columns, changed models, DataParallel) is refused. The
one-line form ``LdbCallback(policy, ...)`` is in tests/test_hf_callback.py.
"""

import math
import types

import pytest
import torch

import ldbfx

transformers = pytest.importorskip("transformers")

from contract import assert_close_to_scale  # noqa: E402
from hf_models import VOCAB, llama, tokens  # noqa: E402


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
