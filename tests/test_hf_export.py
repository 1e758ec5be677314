"""Hugging Face transformers through the torch.export front end (tiny random configs, no downloads).

The same contract as the FX front end (tests/contract.py): outputs bit for bit in train and eval
mode, shared parameters and state_dict keys, eligibility, FLOPs equal to freezing, kept gradients
equal to the frozen reference, on Llama, GPT-2, BERT and ViT. Plus what capturing them takes:
tied weights, aliased inputs, changing sequence lengths, one compile, use_cache, errors that name
the fix, summary/inspection of exported models, PEFT LoRA adapters, and ``ldbfx inspect hf:...``.
"""

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
from hf_models import CASES, VOCAB, _checkpointing_switches, bert, llama, tokens  # noqa: E402


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
    from ldbfx.app.cli import main

    assert main(["inspect", "hf:gpt2"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[1:2] == ["transformer.h.1.mlp.c_fc"])
    assert "addmm" in row and "yes" in row  # GPT-2's Conv1D: an eligible layer that saves dW
    assert main(["inspect", "hf:no_such_model"]) == 2
    assert "unknown Hugging Face model type" in capsys.readouterr().err


def test_an_exported_graph_called_with_other_inputs_says_so():
    # An exported graph computes with its example batch's inputs only: a call with another input
    # (a padding mask it never saw) or without one is refused by name, not a bare TypeError.
    model = llama()
    batch = tokens()
    gm = ldbfx.transform(model, example_kwargs={k: batch[k] for k in ("input_ids", "labels")})
    with pytest.raises(ldbfx.LdbfxError, match=r"inputs input_ids, labels, .* called with attention_mask\. "):
        gm(**batch)
    with pytest.raises(ldbfx.LdbfxError, match=r"called without labels\. .*example_kwargs=batch"):
        gm(input_ids=batch["input_ids"])
    # The same inputs, by name or by position, still run.
    by_name = gm(input_ids=batch["input_ids"], labels=batch["labels"])
    by_position = gm(batch["input_ids"], batch["labels"])
    assert torch.equal(by_name["loss"], by_position["loss"])
