"""Attention projectors: learned or pooled queries read the vision tokens through cross-attention.

    resampler    Qwen-VL `Resampler`: one cross-attention layer, num_queries learned queries, fixed 2D sin-cos
                 positions on queries and keys, then LayerNorm and a d x d projection           tokens Q (256)
    perceiver    Flamingo / Idefics2 perceiver resampler (TinyLLaVA_Factory `connector/resampler.py`):
                 latents attend to [features; latents], depth layers with a 4x FFN             tokens L (64)
    tokenpacker  TokenPacker: queries = the feature map downsampled by `scale` (bilinear); each attends
                 only to its scale x scale region of the (multi-layer) features; then mlp2x_gelu
                                                                                                tokens N/scale^2
    qformer      a light BLIP-2 Q-Former, random init: learned queries, each layer self-attention ->
                 cross-attention to the features -> FFN (pre-norm), then Linear to d            tokens Q (32)

resampler, perceiver and qformer take any grid and a CLS token (it is one more key; the resampler gives it no
position). tokenpacker reads a 2D map: CLS refused, sides must be divisible by `scale`.
AnyRes tiles (Projector.tiles): tokenpacker's queries lie on a grid ("grid": the image's tiles form one token map);
resampler, perceiver and qformer output learned queries with no place on the image ("concat": views one after the
other, no unpadding, no newlines, no pooling under a cap).
Every nn.MultiheadAttention here is batch_first=True.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llava_kit.model.projector_base import (
    Projector,
    ProjectorError,
    check_heads,
    check_positive_int,
    default_heads,
    init_queries,
    sincos_2d,
    square_side,
)


class ResamplerProjector(Projector):
    """Qwen-VL's resampler (embed width D = llm_width): keys/values = LN(kv_proj(features)) + 2D positions, queries
    = LN(learned queries) + 2D positions on a sqrt(Q) x sqrt(Q) grid in the same frame; one multi-head
    cross-attention; then LayerNorm and x @ proj (Qwen-VL's ln_post and proj).

    Parameters: C*d (kv_proj, no bias; absent when C == d) + Q*d + 4d*d + 4d (attention) + 3 * 2d (LayerNorms)
    + d*d (proj).
    """

    tiles = "concat"  # no token grid: each view's tokens follow the last (Idefics2's image splitting)

    def __init__(self, vision_width: int, llm_width: int, grid: Sequence[int], has_cls: bool = False,
                 num_queries: int = 256, num_heads: int | None = None):
        super().__init__(vision_width, llm_width, grid, has_cls)
        check_positive_int("num_queries", num_queries)
        side = square_side(num_queries)
        if side is None:
            raise ProjectorError(f"num_queries={num_queries} must be a square number (the queries sit on a 2D grid "
                                 "with sin-cos positions), e.g. 64, 144 or 256")
        if llm_width % 4:
            raise ProjectorError(f"llm_width={llm_width} must be divisible by 4 for 2D sin-cos positions")
        num_heads = default_heads(llm_width) if num_heads is None else num_heads
        check_heads("llm_width", llm_width, num_heads)
        self.num_output_tokens = num_queries
        self.token_grid = None  # learned queries: no spatial output, so AnyRes concatenates the views
        rows, cols = self.grid
        self.kv_proj = nn.Linear(vision_width, llm_width, bias=False) if vision_width != llm_width else nn.Identity()
        self.query = nn.Parameter(torch.empty(num_queries, llm_width))
        init_queries(self.query)
        self.attn = nn.MultiheadAttention(llm_width, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(llm_width)
        self.ln_kv = nn.LayerNorm(llm_width)
        self.ln_post = nn.LayerNorm(llm_width)
        self.proj = nn.Parameter(llm_width ** -0.5 * torch.randn(llm_width, llm_width))
        # Fixed positions (not saved: rebuilt from the shapes by init_buffers).
        self.register_buffer("key_pos", torch.empty(rows * cols + int(has_cls), llm_width), persistent=False)
        self.register_buffer("query_pos", torch.empty(num_queries, llm_width), persistent=False)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """(Re)compute the fixed sin-cos positions; also called after loading a checkpoint, which does not hold them.

        Keys are placed in the queries' side x side frame; the CLS token, if any, has no position.
        """
        rows, cols = self.grid
        side = square_side(self.num_output_tokens)
        key_pos = sincos_2d(self.llm_width, rows, cols, frame=(side, side))  # [rows*cols, d]
        if self.has_cls:
            key_pos = torch.cat([torch.zeros(1, self.llm_width), key_pos])
        self.key_pos = key_pos.to(self.key_pos.device)  # [(1 +) rows*cols, d]
        self.query_pos = sincos_2d(self.llm_width, side, side).to(self.query_pos.device)  # [Q, d]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_features(features)
        keys = self.ln_kv(self.kv_proj(features))  # [batch, tokens, d]
        queries = (self.ln_q(self.query) + self.query_pos).expand(len(features), -1, -1)  # [batch, Q, d]
        out = self.attn(queries, keys + self.key_pos, keys, need_weights=False)[0]  # [batch, Q, d]
        return self.ln_post(out) @ self.proj  # [batch, Q, d]


class PerceiverLayer(nn.Module):
    """Flamingo's perceiver block: latents attend to [features; latents] (LN on both, no biases), then a 4x FFN."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm_media = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_kv = nn.Linear(width, 2 * width, bias=False)
        self.to_out = nn.Linear(width, width, bias=False)
        self.ffn = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width, bias=False), nn.GELU(),
                                 nn.Linear(4 * width, width, bias=False))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.reshape(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        media, normed = self.norm_media(media), self.norm_latents(latents)  # [batch, tokens, d], [batch, L, d]
        keys, values = self.to_kv(torch.cat([media, normed], dim=1)).chunk(2, dim=-1)  # [batch, tokens + L, d]
        attended = F.scaled_dot_product_attention(self._heads(self.to_q(normed)), self._heads(keys),
                                                  self._heads(values))  # [batch, heads, L, d / heads]
        latents = latents + self.to_out(attended.transpose(1, 2).flatten(2))  # [batch, L, d]
        return latents + self.ffn(latents)


class PerceiverProjector(Projector):
    """Perceiver resampler (Flamingo, Idefics2): Linear(C, d) on the features, num_latents learned latents,
    `depth` perceiver layers, final LayerNorm. No positions: the latents see the tokens as a set.

    Parameters: C*d + d + L*d + depth * (12d*d + 6d) + 2d.
    """

    tiles = "concat"  # no token grid: each view's tokens follow the last (Idefics2's image splitting)

    def __init__(self, vision_width: int, llm_width: int, grid: Sequence[int], has_cls: bool = False,
                 num_latents: int = 64, depth: int = 3, num_heads: int | None = None):
        super().__init__(vision_width, llm_width, grid, has_cls)
        check_positive_int("num_latents", num_latents)
        check_positive_int("depth", depth)
        num_heads = default_heads(llm_width) if num_heads is None else num_heads
        check_heads("llm_width", llm_width, num_heads)
        self.num_output_tokens = num_latents
        self.token_grid = None  # learned queries: no spatial output, so AnyRes concatenates the views
        self.linear = nn.Linear(vision_width, llm_width)
        self.latents = nn.Parameter(torch.empty(num_latents, llm_width))
        init_queries(self.latents)
        self.layers = nn.ModuleList([PerceiverLayer(llm_width, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(llm_width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_features(features)
        media = self.linear(features)  # [batch, tokens, d]
        latents = self.latents.expand(len(features), -1, -1)  # [batch, L, d]
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents)  # [batch, L, d]


class TokenPackerProjector(Projector):
    """TokenPacker: point-to-region cross-attention.

    The input is `num_feature_layers` layers concatenated channel-wise (model.vision.feature_layer as a list; the
    queries read the first layer of the list, keys and values all of them). Queries: the first layer's map
    downsampled by `scale` (bilinear) -> Linear(C1, e, no bias) -> LN; keys / values: mlp2x_gelu(C -> e) -> LN.
    Each query attends only to the scale x scale patches it summarises; then mlp2x_gelu(e -> d).

    Parameters, C1 = C / num_feature_layers, e = hidden_width (default C1): C1*e + 2 * (C*e + e + e*e + e)
    + 4e*e + 4e (attention) + 3 * 2e (LayerNorms) + e*d + d + d*d + d.
    """

    def __init__(self, vision_width: int, llm_width: int, grid: Sequence[int], has_cls: bool = False,
                 scale: int = 2, num_feature_layers: int = 1, hidden_width: int | None = None,
                 num_heads: int | None = None):
        super().__init__(vision_width, llm_width, grid, has_cls)
        self.refuse_cls()
        check_positive_int("scale", scale)
        check_positive_int("num_feature_layers", num_feature_layers)
        if vision_width % num_feature_layers:
            raise ProjectorError(f"vision_width={vision_width} is not num_feature_layers={num_feature_layers} "
                                 "layers of equal width; set num_feature_layers to the length of "
                                 "model.vision.feature_layer")
        rows, cols = self.grid
        if rows % scale or cols % scale:
            divisors = [s for s in range(2, 5) if rows % s == 0 and cols % s == 0]
            self.refuse(f"each query packs a {scale}x{scale} region, so both sides must be divisible by {scale}"
                        + (f"; scale={divisors[0]} fits this grid" if divisors else "; use avgpool or c_abstractor"))
        layer_width = vision_width // num_feature_layers
        hidden_width = layer_width if hidden_width is None else hidden_width
        check_positive_int("hidden_width", hidden_width)
        num_heads = default_heads(hidden_width) if num_heads is None else num_heads
        check_heads("hidden_width", hidden_width, num_heads)
        self.scale = scale
        self.layer_width = layer_width
        self.token_grid = (rows // scale, cols // scale)  # query (i, j) summarises region (i, j), row-major
        self.num_output_tokens = self.token_grid[0] * self.token_grid[1]
        self.q_proj = nn.Linear(layer_width, hidden_width, bias=False)
        self.k_proj = nn.Sequential(nn.Linear(vision_width, hidden_width), nn.GELU(),
                                    nn.Linear(hidden_width, hidden_width))
        self.v_proj = nn.Sequential(nn.Linear(vision_width, hidden_width), nn.GELU(),
                                    nn.Linear(hidden_width, hidden_width))
        self.ln_q, self.ln_k, self.ln_v = (nn.LayerNorm(hidden_width) for _ in range(3))
        self.attn = nn.MultiheadAttention(hidden_width, num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden_width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))

    def _regions(self, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, rows*cols, e] -> [batch * n_queries, scale*scale, e]: each query's region, in query order."""
        batch, _, width = tokens.shape
        rows, cols, s = self.grid[0], self.grid[1], self.scale
        regions = tokens.reshape(batch, rows // s, s, cols // s, s, width).permute(0, 1, 3, 2, 4, 5)
        return regions.reshape(batch * (rows // s) * (cols // s), s * s, width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        first_layer = self.patch_grid(features)[:, : self.layer_width]  # [batch, C1, rows, cols]
        rows, cols = self.grid
        small = F.interpolate(first_layer, size=(rows // self.scale, cols // self.scale), mode="bilinear",
                              align_corners=False)  # [batch, C1, rows/s, cols/s]
        queries = self.ln_q(self.q_proj(small.flatten(2).transpose(1, 2)))  # [batch, Q, e]
        keys = self._regions(self.ln_k(self.k_proj(features)))  # [batch * Q, s*s, e]
        values = self._regions(self.ln_v(self.v_proj(features)))
        batch, num_queries, width = queries.shape
        packed = self.attn(queries.reshape(batch * num_queries, 1, width), keys, values, need_weights=False)[0]
        return self.mlp(packed.reshape(batch, num_queries, width))  # [batch, Q, d]


class QFormerLayer(nn.Module):
    """Pre-norm Q-Former layer: self-attention among the queries, cross-attention to the features, 4x FFN."""

    def __init__(self, width: int, vision_width: int, num_heads: int):
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, num_heads, kdim=vision_width, vdim=vision_width,
                                                batch_first=True)
        self.ffn = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        normed = self.norm_self(queries)
        queries = queries + self.self_attn(normed, normed, normed, need_weights=False)[0]  # [batch, Q, h]
        queries = queries + self.cross_attn(self.norm_cross(queries), features, features, need_weights=False)[0]
        return queries + self.ffn(queries)


class QFormerProjector(Projector):
    """A light Q-Former (BLIP-2's querying transformer, random init, pre-norm, cross-attention in every layer):
    num_queries learned queries of width h, `depth` layers reading the LayerNorm-ed features, a final LayerNorm and
    Linear(h, d) (BLIP-2's language projection).

    Parameters, h = hidden_width (default 768, BERT-base as BLIP-2): Q*h + 2C + depth * (14h*h + 2C*h + 19h)
    + 2h + h*d + d.
    """

    tiles = "concat"  # no token grid: each view's tokens follow the last (Idefics2's image splitting)

    def __init__(self, vision_width: int, llm_width: int, grid: Sequence[int], has_cls: bool = False,
                 num_queries: int = 32, depth: int = 2, hidden_width: int = 768, num_heads: int | None = None):
        super().__init__(vision_width, llm_width, grid, has_cls)
        for label, value in (("num_queries", num_queries), ("depth", depth), ("hidden_width", hidden_width)):
            check_positive_int(label, value)
        num_heads = default_heads(hidden_width, 64) if num_heads is None else num_heads  # BERT: 64-wide heads
        check_heads("hidden_width", hidden_width, num_heads)
        self.num_output_tokens = num_queries
        self.token_grid = None  # learned queries: no spatial output, so AnyRes concatenates the views
        self.query = nn.Parameter(torch.empty(num_queries, hidden_width))
        init_queries(self.query)
        self.norm_features = nn.LayerNorm(vision_width)
        self.layers = nn.ModuleList([QFormerLayer(hidden_width, vision_width, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(hidden_width)
        self.language_projection = nn.Linear(hidden_width, llm_width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_features(features)
        features = self.norm_features(features)  # [batch, tokens, C]
        queries = self.query.expand(len(features), -1, -1)  # [batch, Q, h]
        for layer in self.layers:
            queries = layer(queries, features)
        return self.language_projection(self.norm(queries))  # [batch, Q, d]
