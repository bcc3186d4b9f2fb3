"""LLaDA-V: SigLIP vision tower + mlp2x_gelu projector + the bidirectional LLaDA language tower.

One file, top to bottom: the LLaDA decoder (RMSNorm, RoPE, attention without a causal mask, SwiGLU),
the anyres image packing, the multimodal merge, and `LladaVModel` with the masked-diffusion training
loss. Generation lives in `generation_utils.py` (`diffusion_generate`); the attention layers read and write
the key/value cache of fast decoding (`cache_llada_v.py`).

Notable choices:
- our own decoder stack: transformers' LlamaModel with `is_causal=False` is not bidirectional;
- attention goes through `ALL_ATTENTION_FUNCTIONS` (eager, sdpa, flash...) with `is_causal=False`;
  padded keys are hidden by the attention mask (the official code attended padding);
- the SigLIP feature is the output of the last stored encoder layer *without* post_layernorm;
- the image packing follows the official anyres_max_4 arithmetic exactly (see `image_layout_llada_v.py`);
- the training loss is the official one (docs/parity.md Q19), computed from the hidden states of the masked
  positions only, so a training step never materialises (batch, length, vocab) logits.
"""

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

# First of the transformers imports: an unsupported release stops here with one line (docs/errors.md).
from .compat_llada_v import (  # isort: skip
    ALL_ATTENTION_FUNCTIONS,
    init,
    use_generation_config_class,
    vision_tower_from_config,
)
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, logging

from .cache_llada_v import LladaVDiffusionCache
from .configuration_llada_v import LladaVConfig, LladaVTextConfig
from .denoising_llada_v import LladaVDenoisingRun  # noqa: F401  (imported for transformers 4.57: see below)
from .dllm_cache_llada_v import FeatureCacheView, FeaturePositions, feature_cached_layer_forward, rope_table
from .generation_config_llada_v import LladaVGenerationConfig
from .generation_utils import LladaVGenerationMixin
from .image_layout_llada_v import (
    LAYOUT_ANYRES,
    LAYOUT_NAMES,
    LAYOUT_SINGLE,
    LAYOUT_VIDEO,
    anyres_feature_grid,
    num_crops,
    video_pooled_side,
)

# transformers 4.57 copies into its module cache only the files that the loaded module imports itself, not those
# its imports import: every remote-code module the model runs on is imported here (docs/usage.md#supported-transformers-versions).
from .sampling_llada_v import ClassifierFreeGuidance  # noqa: F401

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------------
# Language tower


class LladaVRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Upcast to fp32, normalise, cast back to the input dtype, then scale (the official order).
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rope_inv_freq(config: LladaVTextConfig) -> torch.Tensor:
    dim = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


class LladaVRotaryEmbedding(nn.Module):
    def __init__(self, config: LladaVTextConfig):
        super().__init__()
        # Non-persistent: transformers 5 re-creates it empty after loading, `_init_weights` refills it.
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in fp32 whatever the activation dtype (no autocast), then cast like the official code.
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim)
            cos, sin = emb.cos(), emb.sin()
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return hidden_states
    b, n_kv, t, hd = hidden_states.shape
    return hidden_states[:, :, None].expand(b, n_kv, n_rep, t, hd).reshape(b, n_kv * n_rep, t, hd)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling  # (B, nh, T, S)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)  # (B, nh, T, hd)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


class LladaVAttention(nn.Module):
    """Plain multi-head attention with RoPE and no causal mask."""

    def __init__(self, config: LladaVTextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: LladaVDiffusionCache | None = None,
        cache_start: int = 0,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, cache_start, k, v)  # (B, nkv, S, hd) over the whole canvas

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            is_causal=False,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


def feature_cache_attention(
    attn: "LladaVAttention",
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    features: FeaturePositions,
) -> torch.Tensor:
    """Attention of a dLLM-Cache pass, with the official cache hook's numerics (docs/parity.md Q36): `q`
    `(b, Tq, nh * hd)` at canvas positions `q_positions` `(b, Tq)`, `k`, `v` `(b, S, nkv * hd)` of the whole
    canvas before RoPE; RoPE in float32 from a table, `softmax(q k^T / sqrt(hd))` in eager form (float32
    softmax), padded keys hidden. Returns `(b, Tq, D)` after o_proj."""
    batch, q_len = q.shape[:2]
    k_len, head_dim = k.shape[1], attn.head_dim
    q = q.view(batch, q_len, -1, head_dim).transpose(1, 2)  # (b, nh, Tq, hd)
    k = k.view(batch, k_len, -1, head_dim).transpose(1, 2)  # (b, nkv, S, hd)
    v = v.view(batch, k_len, -1, head_dim).transpose(1, 2)
    q32, k32 = q.float(), k.float()
    cos_q, sin_q = features.cos[q_positions].unsqueeze(1), features.sin[q_positions].unsqueeze(1)  # (b, 1, Tq, hd)
    cos_k, sin_k = features.cos[features.positions].unsqueeze(1), features.sin[features.positions].unsqueeze(1)
    q = ((q32 * cos_q) + (rotate_half(q32) * sin_q)).type_as(q)
    k = ((k32 * cos_k) + (rotate_half(k32) * sin_k)).type_as(k)
    k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
    weights = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(head_dim)  # (b, nh, Tq, S)
    if features.key_padding is not None:
        weights = weights.masked_fill(~features.key_padding[:, None, None, :], torch.finfo(weights.dtype).min)
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(weights, v)  # (b, nh, Tq, hd)
    return attn.o_proj(out.transpose(1, 2).contiguous().view(batch, q_len, -1))


class LladaVMLP(nn.Module):
    def __init__(self, config: LladaVTextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LladaVDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LladaVTextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LladaVAttention(config, layer_idx)
        self.mlp = LladaVMLP(config)
        self.input_layernorm = LladaVRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LladaVRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        feature_cache: FeatureCacheView | None = None,
        feature_positions: FeaturePositions | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if feature_cache is not None:
            # dLLM-Cache: the rule of what to recompute lives in dllm_cache_llada_v.py, the attention maths here.
            attend = functools.partial(feature_cache_attention, self.self_attn)
            return feature_cached_layer_forward(self, hidden_states, feature_cache, feature_positions, attend)
        residual = hidden_states
        attn_out, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask, **kwargs)
        hidden_states = residual + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def default_position_ids(
    attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> torch.Tensor:
    """Positions 0..L-1 over the merged sequence; with a padding mask, counted over real tokens only, so a
    left-padded row gets the same positions as the row alone."""
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.arange(length, device=device).unsqueeze(0).expand(batch, length)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_bidirectional_mask(
    attention_mask: torch.Tensor | None,
    conversation_ids: torch.Tensor | None,
    query_length: int,
    dtype: torch.dtype,
    attn_implementation: str | None,
    query_start: int = 0,
) -> torch.Tensor | None:
    """Turn a 2D padding mask and/or dialogue turn ids into what the attention function expects.

    Query i may attend key j iff key j is not padding and `conversation_ids[j] <= conversation_ids[i]`.
    Returns None when nothing is hidden (the fastest path), a boolean (B, 1, T, S) mask for sdpa, the 2D
    mask for flash attention, and an additive float mask otherwise. The queries are the positions
    `[query_start, query_start + query_length)` of the key sequence (a cached window).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask  # already prepared by the caller
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    if attention_mask is None and conversation_ids is None:
        return None
    if attn_implementation is not None and "flash" in attn_implementation:
        if conversation_ids is not None:
            raise ValueError(
                f"dialogue-causal attention needs a 4D mask; attn_implementation={attn_implementation!r} only "
                "takes a padding mask. Use 'sdpa' or 'eager'."
            )
        return attention_mask
    allowed = None
    if attention_mask is not None:
        allowed = attention_mask[:, None, None, :].bool()  # (B, 1, 1, S)
    if conversation_ids is not None:
        queries = conversation_ids[:, None, query_start : query_start + query_length, None]
        conv = queries >= conversation_ids[:, None, None, :]  # (B, 1, T, S)
        allowed = conv if allowed is None else (allowed & conv)
    allowed = allowed.expand(allowed.shape[0], 1, query_length, allowed.shape[-1])
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class ChatTurn(NamedTuple):
    """A header-delimited turn of a tokenised conversation (see `find_turns`)."""

    start: int  # position of its `<|start_header_id|>`
    header_end: int | None  # position of its `<|end_header_id|>`; None when the header is not closed
    end: int  # one past its `<|eot_id|>`, or where the next turn starts
    role: tuple[int, ...]  # the ids between the two header tokens (empty when the header is not closed)


def find_turns(ids: Sequence[int], start_header_id: int, end_header_id: int, eot_id: int) -> list[ChatTurn]:
    """Split tokenised conversation ids into the turns of the LLaDA chat template: a turn starts at
    `<|start_header_id|>`, its role is the ids up to `<|end_header_id|>`, and it ends after its `<|eot_id|>`
    (or where the next turn starts). The one parser of turns, for the dialogue mask and the training labels."""
    ids = list(ids)
    starts = [i for i, t in enumerate(ids) if t == start_header_id]
    turns = []
    for k, start in enumerate(starts):
        limit = starts[k + 1] if k + 1 < len(starts) else len(ids)
        header_end = next((i for i in range(start + 1, limit) if ids[i] == end_header_id), None)
        end = limit
        if header_end is not None:
            end = next((i + 1 for i in range(header_end + 1, limit) if ids[i] == eot_id), limit)
        role = tuple(ids[start + 1 : header_end]) if header_end is not None else ()
        turns.append(ChatTurn(start, header_end, end, role))
    return turns


def conversation_ids_from_input_ids(input_ids: torch.Tensor, config: LladaVConfig) -> torch.Tensor:
    """Dialogue turn of every position, for "dialogue causal" attention (docs/parity.md Q23).

    The system prompt and first exchange are turn 0; the turn increments at each user turn that follows an
    assistant turn; every other position keeps the turn of the position before it.
    """
    ids = torch.zeros_like(input_ids)
    user, assistant = (config.user_role_token_id,), (config.assistant_role_token_id,)
    for b in range(input_ids.shape[0]):
        turn, seen_assistant = 0, False
        headers = (config.start_header_token_id, config.end_header_token_id, config.eot_token_id)
        for chat_turn in find_turns(input_ids[b].tolist(), *headers):
            if chat_turn.role == assistant:
                seen_assistant = True
            elif chat_turn.role == user and seen_assistant:
                turn += 1
                seen_assistant = False
                ids[b, chat_turn.start :] = turn
    return ids


class LladaVPreTrainedModel(PreTrainedModel):
    config: LladaVConfig
    config_class = LladaVConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LladaVDecoderLayer", "SiglipEncoderLayer", "SiglipVisionEmbeddings"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.get_text_config().initializer_range
        if isinstance(module, LladaVRotaryEmbedding):
            init.copy_(module.inv_freq, rope_inv_freq(self.config.get_text_config()))
        elif isinstance(module, LladaVModel):
            hidden = module.config.text_config.hidden_size
            init.normal_(module.image_newline, mean=0.0, std=hidden**-0.5)
        else:
            super()._init_weights(module)
        if isinstance(module, (nn.Linear, nn.Embedding)) and hasattr(module, "weight"):
            init.normal_(module.weight, mean=0.0, std=std)


class LladaVTextModel(LladaVPreTrainedModel):
    """The bidirectional LLaDA decoder stack (embeddings, layers, final norm), without lm_head."""

    config: LladaVTextConfig
    config_class = LladaVTextConfig
    base_model_prefix = "model"

    def __init__(self, config: LladaVTextConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LladaVDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LladaVRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LladaVRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        conversation_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        cache: LladaVDiffusionCache | None = None,
        cache_start: int = 0,
        feature_cache: FeatureCacheView | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Run the decoder on embeddings (B, T, D); returns the final-normed states and, optionally, all states.

        With `cache`, the T embeddings are the window `[cache_start, cache_start + T)` of a longer canvas
        whose other keys/values are in the cache; `attention_mask` and `conversation_ids` then cover the
        whole canvas. With `feature_cache` (dLLM-Cache, one group's view), the T embeddings are the whole canvas
        and every layer reuses what the view's refresh decision allows (`LladaVDecoderLayer.forward_feature_cached`).
        """
        if feature_cache is not None:
            return self._forward_feature_cached(inputs_embeds, attention_mask, position_ids, conversation_ids,
                                                output_hidden_states, feature_cache, cache)  # fmt: skip
        batch, length = inputs_embeds.shape[:2]
        total = length if cache is None or cache.length == 0 else cache.length
        if cache is not None and cache.length == 0 and cache_start != 0:
            raise ValueError(f"the cache is empty: the first forward must start at 0, got cache_start={cache_start}")
        if cache_start < 0 or cache_start + length > total:
            raise ValueError(f"window [{cache_start}, {cache_start + length}) is outside the canvas of length {total}")
        if total > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {total} exceeds max_position_embeddings ({self.config.max_position_embeddings})"
            )
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, batch, total, inputs_embeds.device)
            position_ids = position_ids[:, cache_start : cache_start + length]
        mask = build_bidirectional_mask(
            attention_mask,
            conversation_ids,
            length,
            inputs_embeds.dtype,
            self.config._attn_implementation,
            query_start=cache_start,
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        all_hidden = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                cache=cache,
                cache_start=cache_start,
                **kwargs,
            )
            if output_hidden_states:
                all_hidden += (hidden_states,)
        return self.norm(hidden_states), all_hidden

    def _forward_feature_cached(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        conversation_ids: torch.Tensor | None,
        output_hidden_states: bool,
        feature_cache: FeatureCacheView,
        cache: LladaVDiffusionCache | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        batch, length = inputs_embeds.shape[:2]
        if cache is not None or conversation_ids is not None:
            raise ValueError("feature_cache (dLLM-Cache) cannot be combined with a key/value cache or conversation_ids")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"feature_cache needs a (batch, length) attention_mask, got {tuple(attention_mask.shape)}")
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings ({self.config.max_position_embeddings})"
            )
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, batch, length, inputs_embeds.device)
        key_padding = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        cos, sin = rope_table(self.rotary_emb.inv_freq.to(inputs_embeds.device), length)
        features = FeaturePositions(cos, sin, position_ids, key_padding)
        hidden_states = inputs_embeds
        all_hidden = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, feature_cache=feature_cache, feature_positions=features)
            if output_hidden_states:
                all_hidden += (hidden_states,)
        return self.norm(hidden_states), all_hidden


# ----------------------------------------------------------------------------------------------------------
# Vision side


class LladaVMultiModalProjector(nn.Module):
    """`mlp2x_gelu`: Linear(vision -> text), GELU (exact erf), Linear(text -> text)."""

    def __init__(self, config: LladaVConfig):
        super().__init__()
        bias = config.multimodal_projector_bias
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size, bias=bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size, bias=bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


@dataclass
class LladaVModelOutput(ModelOutput):
    """
    Args:
        loss: the masked-diffusion loss (docs/parity.md Q19) when `labels` are given.
        logits: `(batch, kept_positions, vocab)` float logits; None in a training forward unless
            `logits_to_keep` asks for them.
        hidden_states: the decoder's hidden states when `output_hidden_states=True`.
        masked_indices: the positions that were replaced by the mask token (training forward).
        p_mask: per-sample masking probability used for the loss weights (training forward).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    masked_indices: torch.Tensor | None = None
    p_mask: torch.Tensor | None = None


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int, ignore: int | None = None) -> None:
    """`ids` must be an integer `(batch, length)` tensor of ids in `0..vocab_size-1` (`ignore` allowed too);
    a `ValueError` names the offending values instead of an `IndexError` deep in the embedding."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        dtype = f" {ids.dtype}" if isinstance(ids, torch.Tensor) else ""
        raise ValueError(f"{name} must be an integer tensor of shape (batch, length), got{dtype} {shape}")
    valid = (ids >= 0) & (ids < vocab_size)
    if ignore is not None:
        valid |= ids == ignore
    if not bool(valid.all()):
        bad = sorted(set(ids[~valid].tolist()))[:10]
        raise ValueError(f"{name} holds ids outside the vocabulary (0..{vocab_size - 1}): {bad}")


class LladaVModel(LladaVGenerationMixin, LladaVPreTrainedModel):
    """LLaDA-V: vision tower, projector, image newline, bidirectional LLaDA decoder and lm_head."""

    generation_config_class = LladaVGenerationConfig
    _tied_weights_keys = {}
    # Kept out of bitsandbytes quantisation (transformers adds this list to every skip list; lm_head is
    # skipped by default as the output embedding). Side effect: a float16 load keeps them in float32.
    _keep_in_fp32_modules = ["vision_tower", "multi_modal_projector", "image_newline"]
    # Trainer: the loss is already normalised per sample and batch (docs/parity.md Q19).
    accepts_loss_kwargs = False

    def __init__(self, config: LladaVConfig):
        super().__init__(config)
        self.vision_tower = vision_tower_from_config(config.vision_config)
        self.multi_modal_projector = LladaVMultiModalProjector(config)
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))
        self.language_model = LladaVTextModel(config.text_config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a tuple
        use_generation_config_class(model)
        model.use_portable_cpu_4bit_kernels()
        return loaded

    def use_portable_cpu_4bit_kernels(self) -> list[str]:
        """Keep bitsandbytes' portable CPU 4-bit path for layers its packed CPU kernel cannot run.

        bitsandbytes (0.50) repacks a 4-bit weight for its AVX512-BF16 CPU kernel at the first CPU forward; the
        repacking reshapes the quantisation statistics per `blocksize` (64) input features and fails for a layer
        whose `in_features` is not a multiple of it (e.g. a 32-wide tiny model). For such layers this switches
        the repacking off (the module's own `support_avx512bf16_for_cpu` flag), so they dequantise and multiply
        instead; layers of the released sizes keep the fast kernel. Called by `from_pretrained`; a no-op without
        4-bit layers. Returns the names of the layers switched.
        """
        switched = []
        for name, module in self.named_modules():
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            if getattr(module, "support_avx512bf16_for_cpu", False) and state is not None:
                if module.in_features % state.blocksize:
                    module.support_avx512bf16_for_cpu = False
                    switched.append(name)
        return switched

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    # ------------------------------------------------------------------ images

    def encode_vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """SigLIP on (N, 3, S, S) crops -> the selected feature, (N, patches, D_vision).

        Runs only the encoder layers that feed the selected feature (no post_layernorm, no head).
        """
        self._check_pixel_values(pixel_values)
        vision = self.vision_tower
        hidden = vision.embeddings(pixel_values.to(dtype=vision.embeddings.patch_embedding.weight.dtype))
        for layer in vision.encoder.layers[: self.config.num_vision_layers_used]:
            hidden = layer(hidden, None)  # (N, patches, D_vision)
        return hidden

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        channels, side = self.config.vision_config.num_channels, self.config.crop_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (channels, side, side):
            raise ValueError(
                f"pixel_values must be (num_crops, {channels}, {side}, {side}) crops (the processor makes them), got "
                f"shape {tuple(pixel_values.shape)}"
            )

    def encode_crops(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """SigLIP + projector on (N, 3, S, S) crops -> (N, patches, D_text)."""
        return self.multi_modal_projector(self.encode_vision(pixel_values))

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        image_layouts: torch.Tensor | None = None,
        image_num_crops: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Encode and pack every image: one `(num_tokens, D_text)` tensor per image, in input order.

        Args:
            pixel_values: `(total_crops, 3, S, S)`, the crops of all images concatenated (anyres: base crop
                first, then tiles row-major; single: one crop; video: one crop per frame).
            image_sizes: `(num_images, 2)` original (height, width); needed for the anyres layout.
            image_layouts: `(num_images,)` layout codes (0 anyres, 1 single crop, 2 video); default: anyres.
            image_num_crops: `(num_images,)` crops per image; required for video, checked otherwise.
        """
        self._check_pixel_values(pixel_values)
        counts, layouts = self._crop_counts(pixel_values, image_sizes, image_layouts, image_num_crops)
        features = self.encode_crops(pixel_values)
        packed = []
        for image_idx, (feats, layout) in enumerate(zip(torch.split(features, counts), layouts)):
            if layout == LAYOUT_ANYRES:
                size = tuple(int(v) for v in image_sizes[image_idx])
                packed.append(self._pack_anyres(feats, size))
            elif layout == LAYOUT_SINGLE:
                packed.append(torch.cat((feats[0], self.image_newline[None].to(feats.dtype)), dim=0))
            else:
                packed.append(self._pack_video(feats))
        return packed

    def _crop_counts(self, pixel_values, image_sizes, image_layouts, image_num_crops) -> tuple[list[int], list[int]]:
        if image_layouts is None:
            if image_sizes is None:
                raise ValueError("pixel_values need image_sizes (anyres layout) or explicit image_layouts")
            image_layouts = [LAYOUT_ANYRES] * len(image_sizes)
        layouts = [int(v) for v in image_layouts]
        given = None if image_num_crops is None else [int(v) for v in image_num_crops]
        if given is not None and len(given) != len(layouts):
            raise ValueError(f"image_num_crops has {len(given)} entries for {len(layouts)} images")
        if image_sizes is not None and len(image_sizes) != len(layouts):
            raise ValueError(f"image_sizes has {len(image_sizes)} rows for {len(layouts)} images")
        counts = []
        for i, layout in enumerate(layouts):
            if layout not in LAYOUT_NAMES:
                raise ValueError(f"image {i}: unknown layout {layout}; expected one of {LAYOUT_NAMES}")
            if layout == LAYOUT_VIDEO:
                if given is None:
                    raise ValueError("video inputs need image_num_crops (frames per video)")
                counts.append(given[i])
                continue
            if layout == LAYOUT_ANYRES and image_sizes is None:
                raise ValueError(f"image {i}: the anyres layout needs image_sizes")
            size = None if image_sizes is None else tuple(int(v) for v in image_sizes[i])
            expected = num_crops(
                layout, size, 1, pinpoints=self.config.image_grid_pinpoints, crop_size=self.config.crop_size
            )
            if given is not None and given[i] != expected:
                raise ValueError(
                    f"image {i} ({LAYOUT_NAMES[layout]}, size {size}) has {expected} crops, image_num_crops says {given[i]}"
                )
            counts.append(expected)
        if sum(counts) != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} crops but the images need {sum(counts)} ({counts})"
            )
        return counts, layouts

    def _pack_anyres(self, feats: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """(1 + rows*cols, p*p, D) crop features -> base tokens + unpadded, pooled tile grid with newlines."""
        side = self.config.patches_per_side
        grid = anyres_feature_grid(
            image_size,
            self.config.image_grid_pinpoints,
            self.config.crop_size,
            side,
            self.config.max_num_tiles,
            self.config.anyres_pool_threshold,
        )
        rows, cols = grid["grid_rows_cols"]
        base, tiles = feats[0], feats[1:]
        dim = tiles.shape[-1]
        tiles = tiles.view(rows, cols, side, side, dim)  # (gh, gw, p, p, D)
        tiles = tiles.permute(4, 0, 2, 1, 3).contiguous()  # (D, gh, p, gw, p)
        tiles = tiles.flatten(1, 2).flatten(2, 3)  # (D, gh*p, gw*p)
        r0, r1, c0, c1 = grid["unpad_window"]
        tiles = tiles[:, r0:r1, c0:c1]
        if tuple(grid["final_hw"]) != tuple(grid["unpadded_hw"]):
            tiles = nn.functional.interpolate(tiles[None], list(grid["final_hw"]), mode="bilinear")[0]
        tiles = self._append_newline(tiles)  # (D, h, w+1)
        return torch.cat((base, tiles.flatten(1, 2).transpose(0, 1)), dim=0)

    def _pack_video(self, feats: torch.Tensor) -> torch.Tensor:
        """(frames, p*p, D) -> each frame pooled to ceil(p/stride)^2, one newline per row, frames in order."""
        side = self.config.patches_per_side
        frames, _, dim = feats.shape
        grid = feats.view(frames, side, side, dim).permute(0, 3, 1, 2)  # (F, D, p, p)
        pooled = video_pooled_side(side, self.config.video_pool_stride)
        grid = nn.functional.interpolate(grid, size=[pooled, pooled], mode="bilinear")  # (F, D, s, s)
        grid = grid.permute(1, 0, 2, 3).flatten(1, 2)  # (D, F*s, s)
        grid = self._append_newline(grid)  # (D, F*s, s+1)
        return grid.flatten(1, 2).transpose(0, 1)

    def _append_newline(self, grid: torch.Tensor) -> torch.Tensor:
        newline = self.image_newline[:, None, None].to(grid.dtype).expand(*grid.shape[:-1], 1)
        return torch.cat((grid, newline), dim=-1)

    def embed_multimodal(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_layouts: torch.Tensor | None = None,
        image_num_crops: torch.Tensor | None = None,
        image_features: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features written at the `image_token_id` positions.

        Pass `image_features` (from `get_image_features`) to reuse already encoded images.
        """
        check_token_ids("input_ids", input_ids, self.get_input_embeddings().num_embeddings)
        image_mask = input_ids == self.config.image_token_id
        embeds = self.get_input_embeddings()(input_ids)  # (B, L, D); image rows are overwritten below
        n_tokens = int(image_mask.sum())
        if image_features is None and pixel_values is not None:
            image_features = self.get_image_features(pixel_values, image_sizes, image_layouts, image_num_crops)
        n_features = 0 if image_features is None else sum(f.shape[0] for f in image_features)
        if n_tokens != n_features:
            raise ValueError(f"Image features and image tokens do not match: tokens: {n_tokens}, features {n_features}")
        if n_tokens:
            flat = torch.cat(image_features, dim=0).to(device=embeds.device, dtype=embeds.dtype)
            embeds = embeds.masked_scatter(image_mask[..., None].expand_as(embeds), flat)
        return embeds

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_layouts: torch.Tensor | None = None,
        image_num_crops: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        conversation_ids: torch.Tensor | None = None,
        masking_t: torch.Tensor | None = None,
        masked_indices: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor | None = None,
        cache: LladaVDiffusionCache | None = None,
        cache_start: int = 0,
        feature_cache: FeatureCacheView | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> LladaVModelOutput | tuple:
        r"""
        Args:
            input_ids: `(B, L)` ids where every image is already expanded to its `image_token_id` tokens
                (the processor does this).
            attention_mask: `(B, L)` 1 for real tokens, 0 for padding (hidden from every query).
            pixel_values, image_sizes, image_layouts, image_num_crops: see `get_image_features`.
            inputs_embeds: `(B, L, D)` merged embeddings instead of `input_ids` (no image handling then).
            labels: `(B, L)` targets, -100 where not supervised. Enables the masked-diffusion loss: per sample
                `t ~ U(0, 1)`, each supervised position is replaced by the mask token with probability
                `p_mask = (1 - eps) * t + eps`, and the loss is the official
                `sum(CE / p_mask / supervised_count_of_its_sample) / B`.
            masking_t: `(B,)` fixes `t` instead of drawing it (tests, reproducible evaluation).
            masked_indices: `(B, L)` bool, fixes which positions are masked (with `masking_t`, reproduces a
                recorded official step exactly). Without both, `t` then the uniform draws come from torch's
                RNG in the official order (`torch.rand(B)` then `torch.rand(B, L)`).
            conversation_ids: `(B, L)` dialogue turn ids for dialogue-causal attention (a query attends keys of
                its own or earlier turns). With `config.dialogue_causal_attention` they are derived from
                `input_ids` when not given.
            logits_to_keep: which logits to return: an int keeps the last n positions (0 = all), a 1-D tensor
                keeps those positions. Default: all positions without labels, none with labels.
            cache, cache_start: a `LladaVDiffusionCache` and the start of the window that `input_ids` /
                `inputs_embeds` cover (see `LladaVDiffusionCache`); positions in `logits_to_keep` are then
                relative to the window. The first call on an empty cache must cover the whole canvas.
            feature_cache: a dLLM-Cache view (`dllm_cache_llada_v.FeatureCacheView`) for a generation pass over
                the whole canvas; `diffusion_generate` builds it from `LladaVGenerationConfig.dllm_cache`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None and pixel_values is not None:
            raise ValueError("pixel_values cannot be combined with inputs_embeds (merge images into the embeddings)")
        if labels is not None and feature_cache is not None:
            raise ValueError("labels (training) cannot be combined with a feature_cache (dLLM-Cache decoding)")
        if input_ids is not None:
            check_token_ids("input_ids", input_ids, self.get_input_embeddings().num_embeddings)
        self._check_masks(input_ids if input_ids is not None else inputs_embeds, attention_mask, labels, cache)

        if (
            conversation_ids is None
            and self.config.dialogue_causal_attention
            and self.training
            and input_ids is not None
        ):
            # From the clean ids: masking a header token must not move a turn boundary (docs/parity.md Q23).
            conversation_ids = conversation_ids_from_input_ids(input_ids, self.config)

        p_mask = None
        if labels is not None:
            input_ids, inputs_embeds, masked_indices, p_mask = self._mask_supervised(
                input_ids, inputs_embeds, labels, masking_t, masked_indices, cache
            )
        if inputs_embeds is None:
            inputs_embeds = self.embed_multimodal(input_ids, pixel_values, image_sizes, image_layouts, image_num_crops)

        hidden, all_hidden = self.language_model(
            inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            conversation_ids=conversation_ids,
            output_hidden_states=bool(output_hidden_states),
            cache=cache,
            cache_start=cache_start,
            feature_cache=feature_cache,
            **kwargs,
        )

        loss = None
        if labels is not None:
            loss = self._diffusion_loss(hidden, labels, masked_indices, p_mask)

        logits = self._kept_logits(hidden, 0 if logits_to_keep is None and labels is None else logits_to_keep)

        out = LladaVModelOutput(
            loss=loss,
            logits=logits,
            hidden_states=all_hidden,
            masked_indices=masked_indices if labels is not None else None,
            p_mask=p_mask,
        )
        return out if return_dict else out.to_tuple()

    def _check_masks(
        self,
        inputs: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        cache: LladaVDiffusionCache | None,
    ) -> None:
        """Shapes of the attention mask and labels against the inputs, and the label ids."""
        batch, length = inputs.shape[:2]
        total = length if cache is None or cache.length == 0 else cache.length
        if attention_mask is not None and attention_mask.dim() == 2 and tuple(attention_mask.shape) != (batch, total):
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} must be (batch, length) = {(batch, total)}"
            )
        if attention_mask is not None and attention_mask.dim() not in (2, 4):
            raise ValueError(f"attention_mask must be (batch, length), got shape {tuple(attention_mask.shape)}")
        if labels is not None:
            check_token_ids("labels", labels, self.config.text_config.vocab_size, ignore=IGNORE_INDEX)

    def _mask_supervised(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        labels: torch.Tensor,
        masking_t: torch.Tensor | None,
        masked_indices: torch.Tensor | None,
        cache: LladaVDiffusionCache | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The training input: supervised positions replaced by the mask token (drawn or given), and `p_mask`."""
        if cache is not None:
            raise ValueError("labels (training) cannot be combined with a diffusion cache (decoding)")
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if labels.shape != (batch, length):
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal the input shape {(batch, length)}")
        masked_indices, p_mask = self._draw_mask(labels, masking_t, masked_indices)
        if input_ids is not None:
            input_ids = input_ids.masked_fill(masked_indices, self.config.mask_token_id)
        else:
            mask_embed = self.get_input_embeddings().weight[self.config.mask_token_id].to(inputs_embeds.dtype)
            inputs_embeds = torch.where(masked_indices[..., None], mask_embed, inputs_embeds)
        return input_ids, inputs_embeds, masked_indices, p_mask

    def _kept_logits(self, hidden: torch.Tensor, logits_to_keep: int | torch.Tensor | None) -> torch.Tensor | None:
        """float32 logits of the kept positions: an int keeps the last n (0 = all), a tensor those positions."""
        if logits_to_keep is None:
            return None
        if isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            kept = hidden[:, logits_to_keep.to(hidden.device)]
        return self.lm_head(kept).float()

    def _draw_mask(
        self, labels: torch.Tensor, masking_t: torch.Tensor | None, masked_indices: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length = labels.shape
        eps = self.config.diffusion_eps
        if masked_indices is not None and masking_t is None:
            raise ValueError("masked_indices needs masking_t (the loss weights come from t)")
        if masking_t is None:
            masking_t = torch.rand(batch, device=labels.device)
        masking_t = masking_t.to(device=labels.device, dtype=torch.float32)
        if masking_t.shape != (batch,):
            raise ValueError(f"masking_t must have shape ({batch},), got {tuple(masking_t.shape)}")
        if bool(((masking_t < 0) | (masking_t > 1)).any()):
            raise ValueError(f"masking_t must lie in [0, 1], got {masking_t.tolist()}")
        p_mask = (1 - eps) * masking_t + eps
        supervised = labels != IGNORE_INDEX
        if masked_indices is None:
            draws = torch.rand((batch, length), device=labels.device)
            masked_indices = (draws < p_mask[:, None]) & supervised
        else:
            masked_indices = masked_indices.to(device=labels.device, dtype=torch.bool)
            if masked_indices.shape != (batch, length):
                raise ValueError(f"masked_indices shape {tuple(masked_indices.shape)} must be {(batch, length)}")
            if bool((masked_indices & ~supervised).any()):
                raise ValueError("masked_indices marks positions whose label is -100 (not supervised)")
        return masked_indices, p_mask

    def _diffusion_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, masked_indices: torch.Tensor, p_mask: torch.Tensor
    ) -> torch.Tensor:
        batch, length = labels.shape
        answer_lengths = (labels != IGNORE_INDEX).sum(-1, keepdim=True).expand(batch, length)
        p_mask_full = p_mask[:, None].expand(batch, length)
        # lm_head only on masked positions: the training step never holds (B, L, V) logits.
        logits = self.lm_head(hidden[masked_indices]).float()  # (n_masked, V)
        token_loss = (
            nn.functional.cross_entropy(logits, labels[masked_indices], reduction="none") / p_mask_full[masked_indices]
        )
        return torch.sum(token_loss / answer_lengths[masked_indices]) / batch


__all__ = ["LladaVModel", "LladaVPreTrainedModel", "LladaVTextModel", "LladaVModelOutput"]
