"""Conditioning encoders: CLIP text (SD 1.x / 2.x / XL, with XL's pooled projection), the LDM
paper's BERT-like transformer, the class embedder. Attribute names mirror `cond_stage_model.*`
checkpoint keys.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldmrt.errors import ConfigError
from ldmrt.config import (BertConfig, ClassEmbedderConfig, ClipTextConfig, LayerChoice,
                          SpatialRescalerConfig)
from ldmrt.models.layers import LayerNorm32, attention, merge_heads, split_heads


class _ClipEmbeddings(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class _ClipAttention(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(p(x), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        scale = 1.0 / math.sqrt(self.q_proj.out_features // self.heads)   # a constant, not a traced op
        scores = torch.matmul(q * scale, k.transpose(-1, -2)).float() + causal  # (B, h, L, L)
        weights = torch.softmax(scores, dim=-1).to(v.dtype)
        return self.out_proj(merge_heads(torch.matmul(weights, v)))


class _ClipMLP(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        if config.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"ClipTextConfig.hidden_act: expected 'quick_gelu' or 'gelu', "
                              f"found {config.hidden_act!r}")
        self.quick = config.hidden_act == "quick_gelu"
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.quick else F.gelu(x)
        return self.fc2(x)


class _ClipLayer(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.self_attn = _ClipAttention(config)
        self.layer_norm1 = LayerNorm32(config.hidden_size)
        self.mlp = _ClipMLP(config)
        self.layer_norm2 = LayerNorm32(config.hidden_size)

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class _ClipEncoder(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(_ClipLayer(config) for _ in range(config.num_hidden_layers))


class _ClipTextTransformer(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.embeddings = _ClipEmbeddings(config)
        self.encoder = _ClipEncoder(config)
        self.final_layer_norm = LayerNorm32(config.hidden_size)


class _ClipTextModel(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.text_model = _ClipTextTransformer(config)
        if config.projection_dim:
            # transformers' CLIPTextModelWithProjection.text_projection (OpenCLIP's text_projection.T)
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)


class ClipTextConditioner(nn.Module):
    """input_ids (B, L) -> text_embeddings (B, L, D) of `config.layer`; with projection_dim > 0
    the tuple (text_embeddings, pooled (B, projection_dim)) as CLIPTextModelWithProjection.

    Our own module (not transformers' CLIPTextModel, whose module tree changes between
    transformers versions) so parameter names always match `cond_stage_model.transformer.*`.
    """

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.config = config
        self.transformer = _ClipTextModel(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        text = self.transformer.text_model
        hidden = text.embeddings(input_ids.long())                          # (B, L, D)
        length = input_ids.shape[1]
        # Causal mask as an additive fp32 bias: 0 on and below the diagonal.
        causal = torch.full((length, length), torch.finfo(torch.float32).min, device=hidden.device)
        causal = torch.triu(causal, diagonal=1)[None, None]                 # (1, 1, L, L)
        *body, last = text.encoder.layers
        for layer in body:
            hidden = layer(hidden, causal)
        penultimate = hidden                                                # (B, L, D)
        choice, pooled_too = self.config.layer, self.config.projection_dim > 0
        final = (text.final_layer_norm(last(penultimate, causal))
                 if choice == LayerChoice.LAST or pooled_too else None)
        if choice == LayerChoice.LAST:
            text_embeddings = final
        elif choice == LayerChoice.PENULTIMATE:
            text_embeddings = text.final_layer_norm(penultimate)
        else:
            text_embeddings = penultimate                                   # PENULTIMATE_HIDDEN
        if not pooled_too:
            return text_embeddings
        return text_embeddings, self.transformer.text_projection(self._eos_state(final, input_ids))

    def _eos_state(self, final: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """final (B, L, D) at each sequence's first eos token -> (B, D), transformers' pooling rule.

        eos_token_id == 2 is transformers' legacy config (before its PR #24773): the position of
        the largest id. argmax takes the first maximum (torch and ONNX ArgMax alike), on int32 as
        transformers does for ONNX exporters; a row without eos pools position 0.
        """
        ids = input_ids.int()
        key = ids if self.config.eos_token_id == 2 else (ids == self.config.eos_token_id).int()
        position = key.argmax(dim=-1)                                       # (B,)
        index = position.long()[:, None, None].expand(-1, 1, self.config.hidden_size)  # (B, 1, D)
        return torch.gather(final, 1, index)[:, 0]                          # (B, D)


class XAttention(nn.Module):
    """x-transformers' attention (no q/k/v bias), as in the LDM BERTEmbedder."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(proj(x), self.heads) for proj in (self.to_q, self.to_k, self.to_v))
        return self.to_out(merge_heads(attention(q, k, v)))


class XFeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU()),
                                 nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Residual(nn.Module):
    """Parameter-free placeholder keeping x-transformers' [norm, block, residual] key layout."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return x + residual


class _AttnLayers(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(config.n_layer):
            self.layers.append(nn.ModuleList([LayerNorm32(config.n_embed),
                                              XAttention(config.n_embed, config.heads, config.dim_head),
                                              _Residual()]))
            self.layers.append(nn.ModuleList([LayerNorm32(config.n_embed),
                                              XFeedForward(config.n_embed, config.ff_mult), _Residual()]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block, residual in self.layers:
            x = residual(block(norm(x)), x)
        return x


class _AbsolutePositionalEmbedding(nn.Module):
    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)

    def forward(self, length: int, device: torch.device) -> torch.Tensor:
        return self.emb(torch.arange(length, device=device))[None]          # (1, L, D)


class _TransformerWrapper(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.token_emb = nn.Embedding(config.vocab_size, config.n_embed)
        self.pos_emb = _AbsolutePositionalEmbedding(config.n_embed, config.max_seq_len)
        self.attn_layers = _AttnLayers(config)
        self.norm = LayerNorm32(config.n_embed)
        # Present in the original checkpoints though embeddings never use it.
        self.to_logits = nn.Linear(config.n_embed, config.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.token_emb(input_ids) + self.pos_emb(input_ids.shape[1], input_ids.device)
        return self.norm(self.attn_layers(x))


class BertConditioner(nn.Module):
    """input_ids (B, L) -> text_embeddings (B, L, n_embed): TokEmb + PosEmb + N x (LN, MHSA, LN, MLP) + LN."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.transformer = _TransformerWrapper(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids.long())


class ClassEmbedder(nn.Module):
    """class labels (B,) -> one context token (B, 1, embed_dim)."""

    def __init__(self, config: ClassEmbedderConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.n_classes, config.embed_dim)

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(class_labels.long())[:, None, :]


class SpatialRescaler(nn.Module):
    """class-index map (B, H, W) -> (B, out, H * m^n, W * m^n): CompVis `SpatialRescaler` of its
    one-hot map (n_stages resizes by multiplier m, then a learned 1x1 conv), computed without the
    (B, n_classes, H, W) one-hot tensor: the resizes and the conv's weight are linear, so they
    commute, and the conv of a one-hot pixel is a column of its weight (an embedding lookup)."""

    def __init__(self, config: SpatialRescalerConfig):
        super().__init__()
        self.config = config
        self.channel_mapper = nn.Conv2d(config.n_classes, config.out_channels, 1, bias=config.bias)

    def forward(self, segmentation: torch.Tensor) -> torch.Tensor:
        weight = self.channel_mapper.weight[:, :, 0, 0]                    # (out, n_classes)
        x = F.embedding(segmentation.long(), weight.t()).permute(0, 3, 1, 2)   # (B, out, H, W)
        for _ in range(self.config.n_stages):
            x = F.interpolate(x, scale_factor=self.config.multiplier, mode=self.config.method.value)
        if self.channel_mapper.bias is not None:
            x = x + self.channel_mapper.bias[:, None, None]
        return x


def build_conditioner(config: ClipTextConfig | BertConfig | ClassEmbedderConfig | SpatialRescalerConfig | None
                      ) -> nn.Module | None:
    if config is None:
        return None
    kinds = {ClipTextConfig: ClipTextConditioner, BertConfig: BertConditioner,
             ClassEmbedderConfig: ClassEmbedder, SpatialRescalerConfig: SpatialRescaler}
    return kinds[type(config)](config)


