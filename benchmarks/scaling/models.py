"""The two small models of the scaling experiment, sized so that an epoch costs seconds on one CPU core.

- :class:`DeepCNN`: a deep, narrow, plain convolutional net (no normalisation, no residuals, bias-free convolutions
  as in ResNet/MLPerf, one biased linear classifier). Without normalisation its layers train at different scales,
  the regime the layer-wise trust ratio was designed for (the LARS paper's AlexNet without BN).
- :class:`TinyBert`: a post-LayerNorm BERT encoder (the original architecture) with its MLM head
  (dense + GELU + LayerNorm, decoder tied to the token embedding); the head runs on the masked positions only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# (out_channels, stride) of each 3x3 convolution; 28x28 -> 14 -> 7 -> 4. Five convolutions and the classifier: six
# layers whose weight norms and gradient norms differ by an order of magnitude, ~60 us a training example on a core.
CNN_LAYERS = ((8, 2), (16, 2), (16, 1), (16, 1), (32, 2))


class DeepCNN(nn.Module):
    def __init__(self, layers=CNN_LAYERS, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        convs, c = [], in_channels
        for out, stride in layers:
            convs.append(nn.Conv2d(c, out, 3, stride, 1, bias=False))
            c = out
        self.convs = nn.ModuleList(convs)
        self.fc = nn.Linear(c, num_classes)
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.normal_(self.fc.weight, std=1 / math.sqrt(c))
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.fc(x.mean(dim=(2, 3)))


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.ff_in = nn.Linear(hidden, ff)
        self.ff_out = nn.Linear(ff, hidden)
        self.ff_LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, h)
        x = self.attn_LayerNorm(x + self.attn_out(a))
        return self.ff_LayerNorm(x + self.ff_out(F.gelu(self.ff_in(x))))


class TinyBert(nn.Module):
    def __init__(self, vocab_size: int, seq_len: int, hidden: int = 64, layers: int = 2, heads: int = 2,
                 ff: int | None = None):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab_size, hidden)
        self.pos_embeddings = nn.Embedding(seq_len, hidden)
        self.emb_LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(_Layer(hidden, heads, ff or 4 * hidden) for _ in range(layers))
        self.head_dense = nn.Linear(hidden, hidden)
        self.head_LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.decoder_bias = nn.Parameter(torch.zeros(vocab_size))
        for m in self.modules():  # BERT's initialisation
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits [n_masked, vocab] at the positions where ``mask`` is true."""
        x = self.emb_LayerNorm(self.tok_embeddings(ids) + self.pos_embeddings.weight[: ids.shape[1]])
        for layer in self.layers:
            x = layer(x)
        x = self.head_LayerNorm(F.gelu(self.head_dense(x[mask])))
        return x @ self.tok_embeddings.weight.t() + self.decoder_bias
