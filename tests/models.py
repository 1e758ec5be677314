"""The model collection every core test draws from: torchvision, timm, and small custom models.

Inputs are tiny (batch 2, 32-64 px) so the whole contract runs on 2 CPU cores in seconds.
Every exclusion carries a comment saying why.
"""

from __future__ import annotations

from functools import partial

import timm
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer


def x64():
    return torch.randn(2, 3, 64, 64)


def x32():
    return torch.randn(2, 3, 32, 32)


def _timm(name, **kwargs):
    return partial(timm.create_model, name, **kwargs)


# name -> (constructor, input factory). Dropout/drop-path are on where the family has them, so
# the train/eval comparison exercises the RNG and the mode branches.
ZOO = {
    "tv_resnet18": (tvm.resnet18, x64),
    "tv_resnet50": (tvm.resnet50, x64),
    "tv_resnext50_32x4d": (tvm.resnext50_32x4d, x64),  # grouped convolutions
    "tv_densenet121": (tvm.densenet121, x64),
    "tv_mobilenet_v2": (tvm.mobilenet_v2, x64),  # depthwise convolutions
    "tv_mobilenet_v3_small": (tvm.mobilenet_v3_small, x64),
    "tv_efficientnet_b0": (tvm.efficientnet_b0, x64),  # StochasticDepth: train/eval graphs differ
    "tv_shufflenet_v2": (tvm.shufflenet_v2_x0_5, x64),
    "tv_regnet_x_400mf": (tvm.regnet_x_400mf, x64),
    "tv_regnet_y_400mf": (tvm.regnet_y_400mf, x64),
    "tv_convnext_tiny": (tvm.convnext_tiny, x64),
    "tv_swin_t": (tvm.swin_t, x64),  # shifted_window_attention is an fx.wrap'd function
    "tv_squeezenet1_1": (tvm.squeezenet1_1, x64),
    "tv_mnasnet0_5": (tvm.mnasnet0_5, x64),
    # aux_logits=False: GoogLeNet returns a namedtuple with aux heads only in train mode and
    # would train-test differently anyway; the aux heads are covered by the train/eval tests.
    "tv_googlenet": (partial(tvm.googlenet, aux_logits=False, init_weights=True), x64),
    # ViT-B/16 itself needs 224 px; the same class at 32 px (nn.MultiheadAttention inside).
    "tv_vit": (partial(VisionTransformer, image_size=32, patch_size=8, num_layers=2, num_heads=4,
                       hidden_dim=64, mlp_dim=128, dropout=0.1), x32),
    "timm_resnet18": (_timm("resnet18"), x64),
    "timm_dla34": (_timm("dla34"), x64),
    "timm_vit_tiny": (_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, drop_rate=0.1), x32),
    "timm_deit_tiny": (_timm("deit_tiny_patch16_224", img_size=32), x32),
    "timm_convnext_atto": (_timm("convnext_atto"), x64),
    "timm_efficientnet_b0": (_timm("efficientnet_b0", drop_path_rate=0.1), x64),
    "timm_mobilenetv3_small": (_timm("mobilenetv3_small_100"), x64),
    "timm_regnety_002": (_timm("regnety_002"), x64),
    "timm_ghostnet": (_timm("ghostnet_100"), x64),
    "timm_swin_tiny": (_timm("swin_tiny_patch4_window7_224", img_size=56), lambda: torch.randn(2, 3, 56, 56)),
    "timm_mixer_s16": (_timm("mixer_s16_224", img_size=32), x32),
    "timm_lcnet_050": (_timm("lcnet_050"), x64),
    "timm_resnest14d": (_timm("resnest14d"), x64),  # split attention, grouped convs
    "timm_poolformer_s12": (_timm("poolformer_s12"), x64),
}


# ---------------------------------------------------------------------------------------------
# Custom models: the cases the zoo does not cover.
# ---------------------------------------------------------------------------------------------
class TiedLM(nn.Module):
    """Embedding and output head share one weight: they must form one layer."""

    def __init__(self, vocab=50, dim=16, depth=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(self.norm(x))


def tokens():
    return torch.randint(0, 50, (2, 7))


class FunctionalNet(nn.Module):
    """Layers written as functions on raw parameters, a class token and a position embedding."""

    def __init__(self, dim=12):
        super().__init__()
        self.stem = nn.Parameter(torch.randn(dim, 3, 3, 3) * 0.2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.w1 = nn.Parameter(torch.randn(2 * dim, dim) * 0.2)
        self.b1 = nn.Parameter(torch.zeros(2 * dim))
        self.w2 = nn.Parameter(torch.randn(2 * dim, dim) * 0.2)  # used as x @ w2
        self.gamma = nn.Parameter(torch.ones(dim))
        self.w3 = nn.Parameter(torch.randn(dim, dim) * 0.2)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = F.conv2d(x, self.stem, None, stride=2, padding=1)  # (2, dim, 4, 4)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = F.gelu(F.linear(x, self.w1, self.b1)) @ self.w2
        x = x * self.gamma
        x = F.linear(x, self.w3)
        return self.head(x[:, 0])


def img8():
    return torch.randn(2, 3, 8, 8)


class SharedBlock(nn.Module):
    """One module called twice (shared weights across depth)."""

    def __init__(self, dim=10):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(5))
        self.shared = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        x = self.shared(x)
        x = self.shared(torch.relu(x))
        return self.out(x)


def vec10():
    return torch.randn(4, 10)


class TwoTower(nn.Module):
    """Several inputs and a dict output."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.text = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
        self.fuse = nn.Linear(16, 8)
        self.cls = nn.Linear(8, 4)
        self.reg = nn.Linear(8, 1)

    def forward(self, image, features):
        z = torch.relu(self.fuse(torch.cat([self.image(image), self.text(features)], dim=1)))
        return {"logits": self.cls(z), "score": self.reg(z).squeeze(1)}


def two_inputs():
    return (torch.randn(2, 3, 8, 8), torch.randn(2, 6))


class ConvVariety(nn.Module):
    """Conv1d/2d/3d, grouped, depthwise, dilated, strided, padding modes and 'same'."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.c3 = nn.Conv2d(8, 8, 3, padding="same", dilation=2, padding_mode="circular", groups=2)
        self.c4 = nn.Conv2d(8, 8, 5, padding="same", groups=8, bias=False)  # depthwise
        self.c5 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.c6 = nn.Conv1d(8, 8, 3, padding="valid")
        self.c7 = nn.Conv3d(1, 4, 3, padding=1, padding_mode="replicate")
        self.c8 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.c4(self.c3(self.c2(self.c1(x)))))
        x = self.c5(x)  # (2, 8, 4, 4)
        y = self.c6(x.flatten(2))  # (2, 8, 14)
        z = self.c7(x[:, :1].unsqueeze(1))  # (2, 4, 1, 4, 4)
        return self.c8(x).flatten(1).mean(1) + y.mean((1, 2)) + z.mean((1, 2, 3, 4))


class AttentionVariety(nn.Module):
    """nn.MultiheadAttention in its configurations: self/cross, packed/separate, masks, weights."""

    def __init__(self, dim=16):
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.self_attn = nn.MultiheadAttention(dim, 4, dropout=0.1, batch_first=True)
        self.cross = nn.MultiheadAttention(dim, 2, batch_first=False, add_bias_kv=True, add_zero_attn=True)
        self.separate = nn.MultiheadAttention(dim, 2, kdim=8, vdim=12, batch_first=True)
        self.kv = nn.Linear(dim, 8)
        self.vv = nn.Linear(dim, 12)
        self.weights_attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.out = nn.Linear(dim, 3)

    def forward(self, x, memory, pad):
        x = self.inp(x)
        x = x + self.self_attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        q = x.transpose(0, 1)
        mem = memory.transpose(0, 1)
        x = x + self.cross(q, mem, mem)[0].transpose(0, 1)
        x = x + self.separate(x, self.kv(memory), self.vv(memory))[0]
        causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)  # a trace-time constant
        y, w = self.weights_attn(x, x, x, attn_mask=causal, average_attn_weights=False)
        return {"out": self.out(x + y), "weights": w}


def attention_inputs():
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, -1] = True
    return (torch.randn(2, 5, 16), torch.randn(2, 4, 16), pad)


class ModeDependent(nn.Module):
    """Traced-through ``self.training`` branches, F.dropout(training=...) and a tensor constant."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))

    def forward(self, x):
        for layer in self.layers:
            x = F.dropout(torch.relu(layer(x)), 0.3, self.training)
        if self.training:
            x = x * 2
        return x * torch.tensor([0.5, 1.0, 1.5, 2.0, 0.5, 1.0, 1.5, 2.0])


def vec8():
    return torch.randn(3, 8)


CUSTOM = {
    "tied_lm": (TiedLM, tokens),
    "functional": (FunctionalNet, img8),
    "shared_block": (SharedBlock, vec10),
    "two_tower": (TwoTower, two_inputs),
    "conv_variety": (ConvVariety, x32),
    "attention_variety": (AttentionVariety, attention_inputs),
    "mode_dependent": (ModeDependent, vec8),
}
