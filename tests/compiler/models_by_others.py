"""Small modules written the way other code bases write them (torch.nn, T5, timm's ViT,
classifier heads, timm's and nanoGPT's attention), each wrapped in a user-defined module: Dynamo does not
trace torch.nn's own classes as top-level frames."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

D, HIDDEN, HEADS, CLASSES = 32, 64, 4, 16


class TorchEncoderLayer(nn.Module):
    """torch.nn.TransformerEncoderLayer: its FFN is linear → activation → dropout → linear."""

    def __init__(self, p=0.1):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(D, HEADS, HIDDEN, dropout=p, batch_first=True)

    def forward(self, x):
        return self.layer(x)


class T5DenseActDense(nn.Module):
    """transformers' T5DenseActDense with its residual wrapper (T5LayerFF)."""

    def __init__(self, p=0.1):
        super().__init__()
        self.wi = nn.Linear(D, HIDDEN, bias=False)
        self.wo = nn.Linear(HIDDEN, D, bias=False)
        self.dropout = nn.Dropout(p)
        self.layer_norm = nn.LayerNorm(D)

    def forward(self, x):
        hidden = self.dropout(F.relu(self.wi(self.layer_norm(x))))
        if hidden.dtype != self.wo.weight.dtype:
            hidden = hidden.to(self.wo.weight.dtype)
        return x + self.dropout(self.wo(hidden))


class VitMlp(nn.Module):
    """timm's Mlp: fc1 → act → drop1 → norm (Identity) → fc2 → drop2."""

    def __init__(self, p=0.1):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(D, HIDDEN), nn.GELU(), nn.Dropout(p)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(HIDDEN, D), nn.Dropout(p)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class ClassifierHead(nn.Module):
    """Pooled features → dropout → linear, as in torchvision/timm heads."""

    def __init__(self, p=0.2):
        super().__init__()
        self.head_drop = nn.Dropout(p)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):
        return self.head(self.head_drop(x.mean(dim=1)))


class Attention(nn.Module):
    """timm's Attention without fused attention: attention-probability dropout → @ v."""

    def __init__(self, p=0.1):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.attn_drop, self.proj_drop = nn.Dropout(p), nn.Dropout(p)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * (C // HEADS) ** -0.5) @ k.transpose(-2, -1)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class NanoGptAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: its flash path (SDPA with dropout_p in training), or its
    manual path (masked_fill by a registered causal buffer, softmax, dropout, @ v)."""

    def __init__(self, flash, p=0.1, context=16):
        super().__init__()
        self.flash, self.p = flash, p
        self.c_attn, self.c_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.attn_dropout, self.resid_dropout = nn.Dropout(p), nn.Dropout(p)
        self.register_buffer("bias", torch.tril(torch.ones(context, context)).view(1, 1, context, context))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, HEADS, C // HEADS).transpose(1, 2) for t in (q, k, v))
        if self.flash:
            p = self.p if self.training else 0
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            y = self.attn_dropout(torch.nn.functional.softmax(att, dim=-1)) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def one_side(by):
    """The reason for an output-side site whose linear already takes an input-side site's input."""
    return f"the linear's input is block-dropped already by {by}: one side per matmul"


# name: (module class, [(module path, the pass's reason) per dropout site, in graph order])
EXPECTED = {
    "torch_encoder_layer": (
        TorchEncoderLayer,
        [
            ("layer.self_attn", "rewritten"),  # nn.MultiheadAttention's SDPA call
            ("layer.dropout1", "used by add (not a matmul input)"),
            ("layer.dropout", "rewritten"),
            (
                "layer.dropout2",
                one_side("layer.dropout (models_by_others.py:22)"),
            ),
        ],
    ),
    "t5_ffn": (
        T5DenseActDense,
        [
            ("dropout", "rewritten"),
            (
                "dropout",
                one_side("dropout (models_by_others.py:36)"),
            ),
        ],
    ),
    "vit_mlp": (
        VitMlp,
        [
            ("drop1", "rewritten"),
            (
                "drop2",
                one_side("drop1 (models_by_others.py:51)"),
            ),
        ],
    ),
    "classifier_head": (ClassifierHead, [("head_drop", "rewritten")]),
    "attention": (
        Attention,
        [("attn_drop", "rewritten"), ("proj_drop", "rewritten")],
    ),
    "nanogpt_manual": (
        lambda: NanoGptAttention(flash=False),
        [("attn_dropout", "rewritten"), ("resid_dropout", "rewritten")],
    ),
    "nanogpt_flash": (
        lambda: NanoGptAttention(flash=True),
        [("", "rewritten"), ("resid_dropout", "rewritten")],
    ),
}


def example_input(batch=2, tokens=8):
    return torch.randn(batch, tokens, D)
