"""summary, weight_grad_flops and to_networkx."""

import torch
import torchvision

import ldbfx
from contract import backward_flops


def test_weight_grad_flops_predicts_the_savings():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    gm = ldbfx.transform(model)
    x = torch.randn(2, 3, 32, 32)
    stats = model.bn1.running_mean.clone()
    report = ldbfx.inspect.weight_grad_flops(gm, x)
    assert torch.equal(model.bn1.running_mean, stats)  # measuring leaves the model as it was
    eligible = [l for l in ldbfx.layers(gm) if l.eligible]
    predicted = sum(report.weight_grad[l.index] for l in eligible)
    full = backward_flops(lambda: gm(x).sum())
    assert abs(full - report.backward) <= 0.001 * full
    ldbfx.set_dropped(gm, eligible)
    saved = full - backward_flops(lambda: gm(x).sum())
    assert abs(saved - predicted) <= 0.01 * saved
    assert all(report.weight_grad[l.index] == 0 for l in ldbfx.layers(gm) if l.kind == "norm")


def test_summary_table():
    gm = ldbfx.transform(torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)]))
    lines = []
    text = ldbfx.summary(gm, torch.randn(4, 8), print_fn=lines.append)
    assert lines == [text]
    rows = text.splitlines()
    assert rows[0].split() == ["#", "name", "type", "kind", "params", "eligible", "dW", "share"]
    assert rows[2].split()[:6] == ["0", "0", "Linear", "linear", "72", "no"]
    assert rows[6].split() == ["4", "4", "Linear", "linear", "72", "yes", "9.1%"]  # 512 / 5632
    assert rows[-1].startswith("6 layers, 1 eligible (72 of 432 parameters)")
    assert "skips 9.1% of the backward FLOPs" in rows[-1]
    assert "dW share" not in ldbfx.summary(gm, print_fn=lambda s: None)


def test_to_networkx_follows_the_data_flow():
    model = torchvision.models.resnet18()
    gm = ldbfx.transform(model)
    graph = ldbfx.to_networkx(gm)
    layers = ldbfx.layers(gm)
    assert graph.number_of_nodes() == len(layers)
    index = {l.name: l.index for l in layers}
    assert graph.has_edge(index["conv1"], index["bn1"])
    assert graph.has_edge(index["bn1"], index["layer1.0.conv1"])
    assert graph.has_edge(index["bn1"], index["layer1.1.conv1"])  # through the identity skip
    assert not graph.has_edge(index["bn1"], index["layer1.0.bn1"])  # crosses layer1.0.conv1
    assert graph.has_edge(index["layer1.0.bn2"], index["layer1.1.conv1"])  # after the residual add
    assert graph.has_edge(index["layer2.0.downsample.1"], index["layer2.1.conv1"])
    assert graph.nodes[index["fc"]]["eligible"] is False
    import networkx as nx

    assert nx.is_directed_acyclic_graph(graph)
    assert list(nx.topological_sort(graph))[0] == 0
