"""A small Transformer language model (over bytes, or a BPE vocabulary: Config.vocab) whose
dropouts sit before matmuls, where backend="slicecompile" rewrites them: on the attention
probabilities (eager attention, before probabilities @ V) and in the MLP (GELU → dropout →
down-projection). Pre-LayerNorm blocks, causal self-attention, tied input and output embeddings.
The output layer feeds only the loss, so options={"hashed_outputs": active} can rewrite it.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Config:
    vocab: int = 256
    context: int = 256
    layers: int = 4
    heads: int = 4
    width: int = 256
    p: float = 0.1


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)
        self.drop = nn.Dropout(config.p)
        causal = torch.ones(config.context, config.context, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(width // self.heads)
        scores = scores.masked_fill(~self.causal[:length, :length], float("-inf"))
        out = self.drop(scores.softmax(dim=-1)) @ v  # dropout before a batched matmul
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(config.width), nn.LayerNorm(config.width)
        self.attention = Attention(config)
        self.up = nn.Linear(config.width, 4 * config.width)
        self.down = nn.Linear(4 * config.width, config.width)
        self.drop = nn.Dropout(config.p)

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.down(self.drop(F.gelu(self.up(self.norm2(x)))))  # dropout before a linear layer


class LanguageModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed = nn.Embedding(config.vocab, config.width)
        self.position = nn.Parameter(torch.zeros(config.context, config.width))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        nn.init.normal_(self.position, std=0.02)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied with the output: logits start near zero

    def forward(self, tokens, targets):
        """Mean cross-entropy (nats per token) of predicting targets from tokens, both (batch, length)."""
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.norm(x) @ self.embed.weight.t()
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
