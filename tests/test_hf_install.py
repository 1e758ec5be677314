"""``ldbfx.install`` on Hugging Face models: training through the graph on the model object itself.

The model keeps its class, ``save_pretrained``, ``generate`` and ``deepcopy``; the installed forward
follows the model's train/eval mode, refuses another model's graph and an autocast the graph was
not captured under, binds positional inputs by name, and masks padding as the model does.
"""

import copy
import io

import pytest
import torch

import ldbfx

transformers = pytest.importorskip("transformers")

from hf_models import CASES, _checkpointing_switches, bert, llama, tokens  # noqa: E402


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
