"""Per-block install on Hugging Face models (export capture): a Llama's decoder layers run their own
graphs, Hugging Face's activation checkpointing stays on, and Trainer's ``gradient_checkpointing=
True`` works with the one-callback form."""

import copy

import pytest
import torch

import ldbfx
from contract import assert_close_to_scale, saved_bytes

transformers = pytest.importorskip("transformers")

from hf_models import _checkpointing_switches, llama, tokens  # noqa: E402
from ldbfx.hf import LdbCallback  # noqa: E402
from ldbfx.integrations.blocks import block_graphs  # noqa: E402


def model_and_copy(layers=3):
    torch.manual_seed(0)
    model = llama(tied=False, layers=layers)
    return model, copy.deepcopy(model)


def batch():
    data = tokens()
    del data["attention_mask"]  # unpadded: Hugging Face passes the blocks no mask
    return data


def installed(model, data):
    gm = ldbfx.transform(model, example_kwargs=data)
    ldbfx.install(model, gm, blocks="auto", example_kwargs=data)
    return gm


def grads(model):
    return {n.replace("._checkpoint_wrapped_module", ""): None if p.grad is None else p.grad.clone()
            for n, p in model.named_parameters()}


def assert_grads(got, want):
    assert got.keys() == want.keys()
    for name in got:
        assert (got[name] is None) == (want[name] is None), name
        if got[name] is not None:
            # The exported graph's ATen ops against the modules' code: the tensor's scale.
            assert_close_to_scale(got[name], want[name], what=name)


def detach_branches(model, names):
    """The reference for dropped branches: the modules' outputs detached."""
    for name in names:
        def detach(module, args, out):
            return out.detach() if isinstance(out, torch.Tensor) else (out[0].detach(), *out[1:])
        model.get_submodule(name).register_forward_hook(detach)


def test_llama_blocks_match_the_model_freezing_and_detaching():
    model, ref = model_and_copy()
    data = batch()
    gm = installed(model, data)
    assert len(block_graphs(model)) == 3
    outside = {layer.name for layer in ldbfx.layers(gm) if "outside the blocks" in layer.reason}
    assert outside == {"model.norm"}  # embeddings: first 4, lm_head: last 1
    model(**data).loss.backward()
    ref(**data).loss.backward()
    assert_grads(grads(model), grads(ref))

    model.zero_grad(), ref.zero_grad()
    drop = ["model.layers.1.mlp.up_proj", "model.layers.2.self_attn.q_proj"]
    ldbfx.set_dropped(gm, drop)
    for name in drop:
        ref.get_submodule(name).weight.requires_grad_(False)
    model(**data).loss.backward()
    ref(**data).loss.backward()
    assert_grads(grads(model), grads(ref))

    model, ref = model_and_copy()
    gm = installed(model, data)
    branches = ["model.layers.1.mlp", "model.layers.1.self_attn"]
    ldbfx.set_dropped_branches(gm, branches)
    detach_branches(ref, branches)
    model(**data).loss.backward()
    ref(**data).loss.backward()
    assert_grads(grads(model), grads(ref))
    assert all(p.grad is None for p in model.model.layers[1].parameters())


def test_a_block_called_with_another_structure_is_refused():
    model, _ = model_and_copy(layers=2)
    installed(model, batch())
    padded = {**batch(), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    padded["attention_mask"][0, :3] = 0
    with pytest.raises(ldbfx.LdbfxError, match="attention_mask: captured None, now a tensor"):
        model(**padded)
    with torch.no_grad():  # no backward: the blocks' own forward, any inputs
        model(**padded)


@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_checkpointing_saves_what_the_checkpointed_model_saves(reentrant):
    model, ref = model_and_copy()
    data = batch()
    gm = installed(model, data)
    for m in (model, ref):  # after install: the blocks checkpoint as the model's own do
        _checkpointing_switches(m)[0]({"use_reentrant": reentrant})  # the kwargs: positional in both names
        m.train()
    branches = ["model.layers.1.mlp"]
    ldbfx.set_dropped_branches(gm, branches)
    detach_branches(ref, branches)
    out = {}
    mine = saved_bytes(lambda: out.setdefault("mine", model(**data).loss))
    theirs = saved_bytes(lambda: out.setdefault("theirs", ref(**data).loss))
    assert mine == theirs
    out["mine"].backward(), out["theirs"].backward()
    assert_grads(grads(model), grads(ref))


def test_checkpointing_on_before_capture_is_refused_by_name():
    model, _ = model_and_copy(layers=2)
    _checkpointing_switches(model)[0]()
    with pytest.raises(ldbfx.TraceError, match="blocks='auto'"):
        ldbfx.transform(model, example_kwargs=batch())


def test_trainer_gradient_checkpointing_with_the_one_callback_form(tmp_path):
    """Trainer(gradient_checkpointing=True) with LdbCallback(policy): the callback installs per
    block, the blocks checkpoint, DropBP drops branches, dropped blocks' weights stay put."""
    model, _ = model_and_copy()
    rows = [dict(input_ids=t, labels=t.clone()) for t in (torch.arange(16) * (1 + i % 3) % 64 for i in range(16))]
    fields = transformers.TrainingArguments.__dataclass_fields__
    switch = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1, learning_rate=1e-2,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, save_strategy="no", **{switch: True})
    callback = LdbCallback(ldbfx.DropBP, drop_rate=0.5, keep_first_blocks=0, keep_last_blocks=0)
    seen = []

    class Watch(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if callback.policy is not None:
                seen.append((set(callback.policy.dropped), {n: p.detach().clone() for n, p in model.named_parameters()}))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if seen and len(seen[-1]) == 2:
                dropped, before = seen[-1]
                moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
                seen[-1] = (dropped, moved)

    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback, Watch()])
    trainer.train()
    assert callback.gm is not None and ldbfx.installed(model) is None  # the run's end uninstalls
    assert all(getattr(layer, "gradient_checkpointing", False) for layer in model.model.layers)
    assert callback.policy.stats["branches_dropped"] > 0
    for dropped, moved in seen[1:]:  # the first step's draw came with the capture
        for branch in dropped:
            assert not any(n.startswith(branch + ".") for n in moved), branch


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_block_with_all_branches_dropped_is_not_recomputed_and_skips_count_once(reentrant):
    """Checkpointed blocks recompute in the backward. Non-reentrant (Hugging Face's default): one
    whose branches are all dropped holds nothing the backward unpacks and is not recomputed;
    reentrant recomputes every block. Either way a recompute reads the masks again and records
    the same skips (a set), which the optimizer step clears once."""
    model, _ = model_and_copy(layers=4)
    data = batch()
    gm = installed(model, data)
    _checkpointing_switches(model)[0]({"use_reentrant": reentrant})
    model.train()
    graphs = list(block_graphs(model).values())
    cls = type(graphs[0])
    assert all(type(g) is cls for g in graphs)  # identical blocks share one class
    calls = []
    forward = cls.forward
    cls.forward = lambda self, *a, **k: (calls.append(graphs.index(self)), forward(self, *a, **k))[1]
    try:
        ldbfx.set_dropped_branches(gm, ["model.layers.1.self_attn", "model.layers.1.mlp", "model.layers.2.mlp"])
        ldbfx.set_dropped(gm, ["model.layers.2.self_attn.q_proj"])
        loss = model(**data).loss
        assert calls == [0, 1, 2, 3]
        del calls[:]
        loss.backward()
        assert sorted(calls) == ([0, 1, 2, 3] if reentrant else [0, 2, 3])
    finally:
        cls.forward = forward
    q = gm.ldbfx_capture.layer_index["model.layers.2.self_attn.q_proj"]
    assert q in gm.ldbfx_state.skipped_globally()
    assert graphs[2].ldbfx_state.skipped >= {graphs[2].ldbfx_capture.layer_index["self_attn.q_proj"]}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.model.layers[2].self_attn.q_proj.weight.detach().clone()
    opt.step()
    assert torch.equal(model.model.layers[2].self_attn.q_proj.weight, before)
    assert not gm.ldbfx_state.skipped_globally()  # the step cleared every block's record


def test_lora_blocks_with_checkpointing_match_detaching():
    """The language-model fine-tuning case: LoRA, Hugging Face's checkpointing (with PEFT's hook on
    the input embeddings, outside the blocks), branches dropped per block."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], lora_dropout=0.0)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(peft.get_peft_model(llama(tied=False, layers=3), config))
    model, ref = models
    data = batch()
    gm = installed(model, data)
    for m in (model, ref):
        _checkpointing_switches(m)[0]()
        m.train()
    branches = ["base_model.model.model.layers.1.mlp", "base_model.model.model.layers.1.self_attn"]
    assert {b.name for b in ldbfx.branches(gm) if b.eligible} >= set(branches)
    ldbfx.set_dropped_branches(gm, branches)
    detach_branches(ref, branches)
    model(**data).loss.backward()
    ref(**data).loss.backward()
    assert_grads(grads(model), grads(ref))
    assert all(p.grad is None for p in model.base_model.model.model.layers[1].parameters())
    assert model.base_model.model.model.layers[2].mlp.up_proj.lora_A.default.weight.grad is not None


def test_callback_refuses_deepspeed_and_a_model_sharded_before_its_first_batch():
    from types import SimpleNamespace

    with pytest.raises(ldbfx.LdbfxError, match="DeepSpeed is not served.*blocks='auto'"):
        LdbCallback._refuse_data_parallel(SimpleNamespace(deepspeed="ds_config.json"))
    model, _ = model_and_copy(layers=1)
    # What fully_shard leaves: the module's class swapped for a generated FSDP<Class> subclass.
    layer = model.model.layers[0]
    layer.__class__ = type(f"FSDP{type(layer).__name__}", (type(layer),), {})
    callback = LdbCallback(ldbfx.DropBP, blocks="auto")
    with pytest.raises(ldbfx.LdbfxError, match="already sharded.*install per block before"):
        callback._arm_capture(SimpleNamespace(neftune_noise_alpha=None), model)


def test_a_dropped_last_branch_is_not_recomputed():
    """A dropped branch that runs alone up to its gate runs without autograd: it saves nothing, so
    a non-reentrant checkpoint's recompute stops before a dropped last branch (the MLP). Its
    backward FLOPs are then below the checkpointed reference's with the MLP detached, which
    recomputes it."""
    from torch.utils.flop_counter import FlopCounterMode

    model, ref = model_and_copy()
    data = batch()
    gm = installed(model, data)
    for m in (model, ref):
        _checkpointing_switches(m)[0]({"use_reentrant": False})
        m.train()
    branches = ["model.layers.1.mlp"]
    ldbfx.set_dropped_branches(gm, branches)
    detach_branches(ref, branches)
    flops = []
    for m in (model, ref):
        loss = m(**data).loss
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        flops.append(counter.get_total_flops())
    assert_grads(grads(model), grads(ref))
    mlp = model.model.layers[1].mlp
    # The reference recomputes the MLP's projections (a matmul is 2 * tokens * in * out FLOPs;
    # the checkpoint's early stop may spare it the last one); ldbfx recomputes none of them.
    tokens, hidden, inner = 2 * 16, mlp.gate_proj.in_features, mlp.gate_proj.out_features
    assert flops[1] - flops[0] >= 2 * (2 * tokens * hidden * inner)


def test_padded_and_unpadded_batches_from_one_example_with_an_attention_mask():
    """Hugging Face hands the blocks no mask for an unpadded batch and a mask tensor for a padded
    one: from an example with an (unpadded) attention_mask, both structures are captured, and
    both train as the model does."""
    model, ref = model_and_copy()
    data = tokens()  # with an all-ones attention_mask
    gm = installed(model, data)
    assert len(gm.ldbfx_state.blocks) == 2 * 3  # two graphs per block, both following the model's masks
    padded = {**data, "attention_mask": data["attention_mask"].clone()}
    padded["attention_mask"][0, :4] = 0
    branches = ["model.layers.1.mlp"]
    ldbfx.set_dropped_branches(gm, branches)
    detach_branches(ref, branches)
    for batch_ in (data, padded):
        model.zero_grad(), ref.zero_grad()
        model(**batch_).loss.backward()
        ref(**batch_).loss.backward()
        assert_grads(grads(model), grads(ref))
        assert all(p.grad is None for p in model.model.layers[1].mlp.parameters())


def test_a_hook_inside_a_block_is_refused_at_install():
    """A block's exported graph inlines its modules, whose hooks would never run: refused by name
    (here by install's check of what changed since the capture; hooks on the block itself run,
    see tests/test_blocks.py)."""
    model, _ = model_and_copy(layers=2)
    data = batch()
    gm = ldbfx.transform(model, example_kwargs=data)
    model.model.layers[1].mlp.register_forward_hook(lambda m, a, out: out)
    with pytest.raises(ldbfx.LdbfxError, match="layers.1.mlp"):
        ldbfx.install(model, gm, blocks="auto", example_kwargs=data)
    assert ldbfx.installed(model) is None and "forward" not in model.model.layers[0].__dict__
