"""The reference StarCoder2 in PyTorch, written to be traced.

The KV cache goes in and out of ``forward`` as plain tensors, so the exported graph shows it;
nothing branches on tensor values; no cache objects. Parameter names are transformers' own, so
a Hugging Face ``model.safetensors`` loads with ``load_state_dict`` unchanged.

Shapes: B batch, T new tokens, P past tokens, S = P + T, H heads, G kv heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Starcoder2Config

KV = tuple[torch.Tensor, torch.Tensor]


def attention_allowed(attention_mask: torch.Tensor, query_len: int, window: int) -> torch.Tensor:
    """Which keys each query may attend to: (B, 1, T, S) bool.

    ``attention_mask`` is (B, S) with 0 for left padding; queries are the last ``query_len``
    slots. A query in slot q sees a key in slot k when ``q - window < k <= q`` (the window
    includes the query itself) and the key is not padding. Left padding shifts slots and
    positions by the same amount per row, so slot distance equals position distance.
    """
    total = attention_mask.shape[1]
    key_slot = torch.arange(total, device=attention_mask.device)
    query_slot = torch.arange(query_len, device=attention_mask.device) + (total - query_len)
    distance = query_slot[:, None] - key_slot[None, :]  # (T, S)
    causal = (distance >= 0) & (distance < window)
    return causal[None, None, :, :] & attention_mask[:, None, None, :].bool()


def default_position_ids(attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
    """Positions that follow the mask: padding does not count, the first real token is 0."""
    positions = torch.cumsum(attention_mask.long(), dim=-1) - 1
    return positions.clamp(min=0)[:, attention_mask.shape[1] - query_len:]


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE, cos/sin computed in float32 then cast to the model dtype."""

    def __init__(self, config: Starcoder2Config):
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (B, 1, T, D)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: Starcoder2Config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = config.use_bias
        self.q_proj = Linear(config.hidden_size, q_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, kv_dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, kv_dim, bias=bias)
        self.o_proj = Linear(q_dim, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor,
                past: KV | None) -> tuple[torch.Tensor, KV]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, D)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:
            k = torch.cat((past[0], k), dim=2)  # (B, G, S, D)
            v = torch.cat((past[1], v), dim=2)
        present = (k, v)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:  # a config constant, not a tensor value: GQA repeats each kv head
            s = k.shape[2]
            k = k[:, :, None].expand(b, self.num_kv_heads, groups, s, self.head_dim).reshape(b, self.num_heads, s, self.head_dim)
            v = v[:, :, None].expand(b, self.num_kv_heads, groups, s, self.head_dim).reshape(b, self.num_heads, s, self.head_dim)
        # Scores and softmax in float32 (fp16 overflows here); a fully masked row (a padding
        # query) gets a uniform softmax instead of NaN because the fill value is finite.
        scores = torch.matmul(q, k.transpose(2, 3)).float() * self.scale  # (B, H, T, S)
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out), present


class MLP(nn.Module):
    def __init__(self, config: Starcoder2Config):
        super().__init__()
        self.c_fc = Linear(config.hidden_size, config.intermediate_size, bias=config.use_bias)
        self.c_proj = Linear(config.intermediate_size, config.hidden_size, bias=config.use_bias)
        self.approximate = config.gelu_approximation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Linear(nn.Linear):
    """``nn.Linear``, whose weights may be stored narrower than the activations: a big checkpoint's
    fp16 weights computed in float32 (``load_checkpoint(..., compute_dtype=torch.float32)``, the
    parity reference of a model whose fp32 copy does not fit), cast one matrix at a time. With
    one dtype (every export) it is exactly ``nn.Linear``: the check is Python, not a graph op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype:
            return super().forward(x)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose statistics are computed in float32 whatever the weights' dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return super().forward(x)
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, config: Starcoder2Config):
        super().__init__()
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.norm_epsilon)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=config.norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, allowed, past: KV | None) -> tuple[torch.Tensor, KV]:
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, allowed, past)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class Starcoder2Model(nn.Module):
    """The body every head sits on: embeddings, decoder layers and final norm, named as
    transformers names them. ``forward(input_ids, attention_mask, position_ids, past) ->
    (hidden, present)``: the final-norm hidden states (B, T, hidden) and one ``(key, value)``
    per layer, each (B, G, P + T, D).
    """

    def __init__(self, config: Starcoder2Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = LayerNorm(config.hidden_size, eps=config.norm_epsilon)
        self.rotary = RotaryEmbedding(config)
        # None: compute in the weights' dtype; a dtype: activations (and the cache) in it (Linear)
        self.compute_dtype: torch.dtype | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                past: list[KV] | tuple[KV, ...] | None = None) -> tuple[torch.Tensor, list[KV]]:
        batch, query_len = input_ids.shape
        past_len = past[0][0].shape[2] if past else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_len + query_len, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, query_len)
        allowed = attention_allowed(attention_mask, query_len, self.config.attention_window)
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        if self.compute_dtype is not None and x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        cos, sin = self.rotary(position_ids, x.dtype)
        present: list[KV] = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, allowed, past[i] if past else None)
            present.append(kv)
        return self.norm(x), present

    def empty_past(self, batch: int = 1) -> list[KV]:
        """A zero-length cache: prefill is a decode step with no past."""
        c = self.config
        p = self.embed_tokens.weight
        shape = (batch, c.num_key_value_heads, 0, c.head_dim)
        dtype = self.compute_dtype or p.dtype
        return [(p.new_zeros(shape, dtype=dtype), p.new_zeros(shape, dtype=dtype)) for _ in range(c.num_hidden_layers)]


class OnBody(nn.Module):
    """A model whose body is ``self.model`` (a :class:`Starcoder2Model`) with a head on top: the
    causal LM and the classifiers share the body's config and cache."""

    model: Starcoder2Model

    @property
    def config(self) -> Starcoder2Config:
        """The body's config: one object, so replacing it here changes what the body computes."""
        return self.model.config

    @config.setter
    def config(self, value: Starcoder2Config) -> None:
        self.model.config = value

    def empty_past(self, batch: int = 1) -> list[KV]:
        """A zero-length cache: prefill is a decode step with no past."""
        return self.model.empty_past(batch)


class Starcoder2(OnBody):
    """StarCoder2 causal LM: ``forward(input_ids, attention_mask, position_ids, past) -> (logits, present)``.

    ``past``/``present``: one ``(key, value)`` per layer, each (B, G, P, D). ``attention_mask``:
    (B, P + T), 0 marks left padding. Logits are float32 whatever the model dtype. The body is
    ``self.model`` (:class:`Starcoder2Model`); the LM head is the tied embedding or ``lm_head``.
    ``logits_to_keep`` (transformers' name): N > 0 computes logits for the last N positions only,
    (B, min(N, T), vocab); 0 keeps every position. Generation reads one position per prefill, and
    at 1,024 tokens x 49,152 vocab the LM head is a quarter of a prefill's multiplications.
    """

    def __init__(self, config: Starcoder2Config):
        super().__init__()
        self.model = Starcoder2Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.eval()  # there is no training-only behaviour (dropout) in this module

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                past: list[KV] | tuple[KV, ...] | None = None,
                logits_to_keep: int = 0) -> tuple[torch.Tensor, list[KV]]:
        x, present = self.model(input_ids, attention_mask, position_ids, past)
        if logits_to_keep:  # a Python int: the exporter adds the graph's own Slice (export/trace.py)
            x = x[:, -logits_to_keep:]  # (B, N, hidden)
        w = self.lm_head_weight
        logits = F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype)).float()  # (B, T or N, vocab)
        return logits, present
