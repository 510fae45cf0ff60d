"""A tiny BERT-style sentence encoder (random init) for transformer export and quantization tests.

Attention is written out with Linear, matmul, softmax, LayerNorm and GELU rather than ``nn.MultiheadAttention``
or ``nn.TransformerEncoder``, whose fused fast paths do not export cleanly. The forward pass takes int64
``input_ids`` and ``attention_mask`` ([B, T], T <= ``max_len``) and returns the mask-aware mean of the last hidden
states ([B, hidden]), so padding never changes a sentence's embedding.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

VOCAB_SIZE = 8000
HIDDEN = 256
NUM_LAYERS = 4
NUM_HEADS = 4
FFN_DIM = 1024
MAX_LEN = 64
PAD_ID = 0
CLS_ID = 1
# Additive attention bias for padded keys. BERT's -10000 rather than -inf or finfo.min: exp() still underflows to
# exactly 0 in fp32, there is no inf - inf = NaN risk, and quantization calibration ranges stay finite.
MASK_BIAS = -10000.0
LN_EPS = 1e-12
# Suggested ONNX graph names. Not "embedding" for the output: the dynamo exporter already names an internal value
# "embedding" (the aten op), and the clash yields a graph onnxruntime rejects ("Duplicate definition of name").
ONNX_INPUT_NAMES: tuple[str, str] = ("input_ids", "attention_mask")
ONNX_OUTPUT_NAME = "sentence_embedding"


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention with an additive key-padding bias."""

    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden {hidden} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """``x`` [B, T, hidden]; ``key_bias`` [B, 1, 1, T] (0 for real tokens, MASK_BIAS for padding)."""
        b, t, hidden = x.shape
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim)) + key_bias
        context = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, H, T, D]
        return self.out(context.transpose(1, 2).reshape(b, t, hidden))


class EncoderLayer(nn.Module):
    """Post-LayerNorm transformer layer as in BERT: attention + residual + LN, FFN (GELU) + residual + LN."""

    def __init__(self, hidden: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.attention = SelfAttention(hidden, num_heads)
        self.attention_norm = nn.LayerNorm(hidden, eps=LN_EPS)
        self.ffn_in = nn.Linear(hidden, ffn_dim)
        self.gelu = nn.GELU()
        self.ffn_out = nn.Linear(ffn_dim, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=LN_EPS)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x, key_bias))
        return self.ffn_norm(x + self.ffn_out(self.gelu(self.ffn_in(x))))


class TinyBertEncoder(nn.Module):
    """BERT-style encoder: forward(input_ids int64 [B, T], attention_mask int64 [B, T]) -> float [B, hidden]."""

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        hidden: int = HIDDEN,
        num_layers: int = NUM_LAYERS,
        num_heads: int = NUM_HEADS,
        ffn_dim: int = FFN_DIM,
        max_len: int = MAX_LEN,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.token_embedding = nn.Embedding(vocab_size, hidden)
        self.position_embedding = nn.Embedding(max_len, hidden)
        self.embedding_norm = nn.LayerNorm(hidden, eps=LN_EPS)
        self.layers = nn.ModuleList(EncoderLayer(hidden, num_heads, ffn_dim) for _ in range(num_layers))
        self.apply(_init_weights)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        positions = torch.arange(seq_len, device=input_ids.device)
        x = self.embedding_norm(self.token_embedding(input_ids) + self.position_embedding(positions))
        mask = attention_mask.to(x.dtype)  # [B, T], 1 = real token
        key_bias = ((1.0 - mask) * MASK_BIAS)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, key_bias)
        summed = (x * mask[:, :, None]).sum(dim=1)
        count = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        return summed / count


def _init_weights(module: nn.Module) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def make_tiny_bert(seed: int = 0) -> TinyBertEncoder:
    """A randomly initialised :class:`TinyBertEncoder` in eval mode, identical for the same ``seed``.

    The global torch RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyBertEncoder()
    return model.eval()


def random_token_batch(n: int, seq_len: int = 32, vocab: int = VOCAB_SIZE, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` random "sentences" as int64 ``input_ids`` and ``attention_mask`` arrays of shape [n, seq_len].

    Each row starts with ``CLS_ID``, has a random length in [seq_len // 4, seq_len] and is padded with
    ``PAD_ID`` (mask 0) after it. When ``n >= 2`` the last row is only half full, so a batch always has padding.
    """
    if n < 1 or not 2 <= seq_len <= MAX_LEN or vocab <= CLS_ID + 1:
        raise ValueError(f"need n >= 1, 2 <= seq_len <= {MAX_LEN} and vocab > {CLS_ID + 1}")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(2, seq_len // 4), seq_len + 1, size=n)
    if n >= 2:
        lengths[-1] = max(2, seq_len // 2)
    input_ids = rng.integers(CLS_ID + 1, vocab, size=(n, seq_len), dtype=np.int64)
    input_ids[:, 0] = CLS_ID
    attention_mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
    input_ids[attention_mask == 0] = PAD_ID
    return {"input_ids": input_ids, "attention_mask": attention_mask}
