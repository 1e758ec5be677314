"""Branch drop on PEFT models: adapters are part of their layer, and a step that reaches nothing
trainable behaves like DropBP's reference (the backward runs and updates nothing) on every path.

Tiny random Llama and Qwen2 configs (3 decoder layers: a kept first and last block and one between),
LoRA, DoRA, VeRA and AdaLoRA from peft.
"""

import copy

import pytest
import torch

import ldbfx

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from contract import assert_close_to_scale, backward_flops, grads  # noqa: E402

VOCAB, LAYERS = 64, 3
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base(family="llama"):
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family](
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=True,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


ADAPTERS = {
    "lora": lambda: peft.LoraConfig(r=4, target_modules=ALL, lora_dropout=0.0),
    "lora-dropout": lambda: peft.LoraConfig(r=4, target_modules=ALL, lora_dropout=0.1),
    # rank 16 outweighs the 32-to-16 key and value projections: inside a branch, still no branch
    "lora-r16": lambda: peft.LoraConfig(r=16, target_modules=ALL, lora_dropout=0.0),
    "dora": lambda: peft.LoraConfig(r=4, target_modules=ALL, lora_dropout=0.0, use_dora=True),
    "dora-dropout": lambda: peft.LoraConfig(r=4, target_modules=ALL, lora_dropout=0.1, use_dora=True),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"]),
    "adalora": lambda: peft.AdaLoraConfig(r=4, target_modules=ALL, total_step=10),
}


def tokens(seed=0, length=12):
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def lora_model(family="llama", adapter="lora", **options):
    model = peft.get_peft_model(base(family), ADAPTERS[adapter]() if not options else
                                peft.LoraConfig(r=4, target_modules=ALL, lora_dropout=0.0, **options))
    model.train()
    return model


@pytest.fixture(scope="module")
def base_branches():
    found = {}
    for family in ("llama", "qwen2"):
        gm = ldbfx.transform(base(family), example_kwargs=tokens())
        found[family] = [(b.name, b.eligible, b.reason) for b in ldbfx.branches(gm)]
    return found


@pytest.mark.parametrize("family, adapter", [("llama", a) for a in ADAPTERS if a not in ("lora", "lora-dropout")]
                         + [("qwen2", "lora-dropout"), ("qwen2", "dora")])  # Qwen2: biases on q, k, v
def test_adapters_leave_the_base_models_branches(family, adapter, base_branches):
    model = lora_model(family, adapter)
    gm = ldbfx.transform(model, example_kwargs=tokens())
    records = ldbfx.branches(gm)
    want = [(f"base_model.model.{name}", eligible, reason) for name, eligible, reason in base_branches[family]]
    assert [(b.name, b.eligible, b.reason) for b in records] == want
    assert len(records) == 2 * LAYERS
    # Every layer under a branch's module (the frozen base layers and the adapters) is inside it.
    layers = [layer.name for layer in ldbfx.layers(gm)]
    for branch in records:
        under = {name for name in layers if name.startswith(branch.name + ".")}
        assert under and under <= set(branch.layers), branch.name
        assert branch.skip_layers == ()
    trainable = {layer.name for layer in ldbfx.layers(gm) if layer.reason != "frozen"}
    assert all(set(b.layers) & trainable for b in records), "the adapters belong to the branches"


def _detached_reference(model, dropped: list[str]):
    """The model with each named block's output detached by a forward hook (DropBP's reference)."""
    ref = copy.deepcopy(model)

    def detach(module, args, output):
        if isinstance(output, tuple):  # attention returns (output, weights)
            return (output[0].detach(), *output[1:])
        return output.detach()

    for name in dropped:
        ref.get_submodule(name).register_forward_hook(detach)
    return ref


def test_half_the_branches_dropped_cost_what_detaching_them_costs():
    model = lora_model()
    inputs = tokens()
    gm = ldbfx.transform(model, example_kwargs=inputs)
    eligible = [b.name for b in ldbfx.branches(gm) if b.eligible]
    dropped = eligible[::2]
    ref = _detached_reference(model, dropped)
    ref.config.use_cache = False  # the reference's own export (ldbfx's capture leaves the cache out itself)
    # The untransformed graph of the reference, so that both sides run torch.export's kernels.
    ref_graph = torch.export.export(ref, (), dict(inputs), strict=False).module()
    ldbfx.set_dropped_branches(gm, dropped)
    flops = backward_flops(lambda: gm(**inputs).loss)
    want = backward_flops(lambda: ref(**inputs).loss)
    full = backward_flops(lambda: model(**inputs).loss)
    assert flops == want < full
    model.zero_grad(set_to_none=True)
    gm(**inputs).loss.backward()
    got = grads(model)
    ref.zero_grad(set_to_none=True)
    ref_graph(**inputs).loss.backward()
    expected = grads(ref)
    assert {n for n, g in got.items() if g is None} == {n for n, g in expected.items() if g is None}
    for name, g in got.items():
        if g is not None:  # exported kernels on both sides; the hook-detached graph may fuse otherwise
            assert_close_to_scale(g, expected[name], rel=1e-4, what=name)
    for name in dropped:  # nothing inside a dropped block trained, adapters included
        assert all(p.grad is None for p in model.get_submodule(name).parameters())


def test_kept_first_and_last_blocks_train():
    model = lora_model()
    inputs = tokens()
    gm = ldbfx.transform(model, example_kwargs=inputs)
    ldbfx.set_dropped_branches(gm, [b.name for b in ldbfx.branches(gm) if b.eligible])
    gm(**inputs).loss.backward()
    for block in ("base_model.model.model.layers.0", f"base_model.model.model.layers.{LAYERS - 1}"):
        adapters = {n: p for n, p in model.get_submodule(block).named_parameters() if p.requires_grad}
        assert adapters and all(p.grad is not None for p in adapters.values()), block
        # lora_B starts at zero, so lora_A's first gradient is zero; lora_B's is not.
        assert all(p.grad.abs().sum() > 0 for n, p in adapters.items() if "lora_B" in n), block


def _untouched_after_a_step(model, run) -> None:
    """``run()`` computes a loss; its backward must run and an AdamW step (weight decay on) must
    leave every parameter as it was."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    loss = run()
    loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


class _Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc = torch.nn.LayerNorm(16), torch.nn.Linear(16, 16)

    def forward(self, x):
        return x + self.fc(self.norm(x))


def _middle_trains():
    """Five residual blocks of which only the middle one's trains (LoRA on a middle layer)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[_Residual() for _ in range(5)])
    for i, block in enumerate(model):
        block.requires_grad_(i == 2)
    return model, torch.randn(4, 16)


@pytest.mark.parametrize("mode", ["eager", "dense", "compiled"])
@pytest.mark.parametrize("make", ["lora", "mlp"])
def test_a_step_that_reaches_nothing_trainable_runs_and_updates_nothing(make, mode):
    # LoRA on the middle layer only: the kept first and last blocks train nothing, so dropping
    # every eligible branch leaves no trainable parameter behind the loss. Compiled on the MLP
    # only (the gate is the same op on both front ends; an HF model compiles for half a minute).
    if make == "lora":
        if mode == "compiled":
            pytest.skip("compiled on the MLP")
        model, inputs = lora_model(layers_to_transform=[1]), tokens()
        gm = ldbfx.transform(model, example_kwargs=inputs)
        loss = lambda net: net(**inputs).loss  # noqa: E731
    else:
        model, x = _middle_trains()
        gm = ldbfx.transform(model)
        loss = lambda net: net(x).square().mean()  # noqa: E731
    if mode == "dense":
        ldbfx.distributed.dense_gradients(gm)
    net = torch.compile(gm, backend="aot_eager", dynamic=True) if mode == "compiled" else gm
    ldbfx.set_dropped_branches(gm, [b.name for b in ldbfx.branches(gm) if b.eligible])
    out = loss(net)
    assert out.requires_grad
    want = loss(model)  # the forward is unchanged
    assert_close_to_scale(out.detach(), want.detach(), rel=1e-5, what="loss")
    _untouched_after_a_step(model, lambda: loss(net))
    ldbfx.set_dropped_branches(gm, [])  # and a full step after it trains again
    loss(net).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    torch._dynamo.reset()


@pytest.mark.parametrize("keep", ["keep_first_blocks=0", "layers"])
def test_nothing_reachable_with_no_kept_block_or_every_layer_dropped(keep):
    model = lora_model()
    inputs = tokens()
    if keep == "layers":  # layer drop of every layer that trains
        gm = ldbfx.transform(model, example_kwargs=inputs, keep_first=0, keep_last=0)
        ldbfx.set_dropped(gm, [layer.name for layer in ldbfx.layers(gm) if layer.eligible])
    else:
        gm = ldbfx.transform(model, example_kwargs=inputs, keep_first_blocks=0, keep_last_blocks=0)
        ldbfx.set_dropped_branches(gm, [b.name for b in ldbfx.branches(gm)])
    _untouched_after_a_step(model, lambda: gm(**inputs).loss)
    assert all(p.grad is None for p in model.parameters())


def test_a_step_that_reaches_nothing_trainable_under_an_fp16_grad_scaler():
    # The scaler must find gradients to check (zeros), and the step must still update nothing.
    model = lora_model(layers_to_transform=[1])
    inputs = tokens()
    gm = ldbfx.transform(model, example_kwargs=inputs)
    ldbfx.set_dropped_branches(gm, [b.name for b in ldbfx.branches(gm) if b.eligible])
    scaler = torch.amp.GradScaler("cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    scaler.scale(gm(**inputs).loss).backward()
    scaler.step(optimizer)
    scaler.update()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def _steps_dropping_everything(policy, gm, inputs, optimizer, everything, steps=10) -> int:
    """Trains ``steps`` steps under ``policy``; counts those whose draw dropped everything that
    trains (``everything(policy)``)."""
    count = 0
    for _ in range(steps):
        count += everything(policy)
        gm(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        policy.step()
    return count


def test_policies_count_the_steps_that_trained_nothing():
    model = lora_model(layers_to_transform=[1])
    inputs = tokens()
    gm = ldbfx.transform(model, example_kwargs=inputs)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    policy = ldbfx.DropBP(gm, optimizer, drop_rate=0.8, seed=3)
    candidates = len(policy.rates)
    policy.start_epoch(0)
    count = _steps_dropping_everything(policy, gm, inputs, optimizer, lambda p: len(p.dropped) == candidates)
    assert 0 < count < 10 and policy.stats["steps_nothing_trained"] == count


def test_layer_dropback_counts_the_steps_that_trained_nothing():
    model = lora_model(layers_to_transform=[1])
    inputs = tokens()
    gm = ldbfx.transform(model, example_kwargs=inputs, keep_first=0, keep_last=0)
    trainable = [l.name for l in ldbfx.layers(gm) if any(model.get_parameter(p).requires_grad for p in l.params)]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    policy = ldbfx.LayerDropBack(gm, optimizer, drop_rate=0.9, period=1, kappa=1, seed=0, layers=trainable)
    policy.start_epoch(1)
    count = _steps_dropping_everything(policy, gm, inputs, optimizer, lambda p: set(p.dropped) == set(trainable))
    assert 0 < count < 10 and policy.stats["steps_nothing_trained"] == count
