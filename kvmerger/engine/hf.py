"""Everything that depends on transformers' internals, in one place (written for transformers 5.24).

* `CompressedLayer` / `CompressedCache`: a cache whose layers keep *tokens seen* (RoPE positions,
  `generate()`'s input slicing) apart from *slots stored* (mask sizes), plus an optional additive
  logit bias per stored slot and KV head. A layer whose heads share its budget (they hold different
  numbers of slots) is *packed*: every head's slots in one row [B, 1, N, d] with a KV-head tag per
  slot (and, for a fitted merge, one bias per slot), so that the tensors hold exactly the slots
  kept, no padding.
* The attention function registered as ``"kvmerger"``: transformers' own sdpa path, with the
  per-slot bias added (for a packed layer: one sdpa call over the row, each query head masked to
  its KV head's slots), and the hook through which a compression session sees each layer's query
  and key states once, right after the prompt's prefill attention of that layer (with each
  softmax row's log-normaliser, where `engine.kernels` can keep it).
* Layer kinds: full-attention layers get a `CompressedLayer` and are compressed; sliding-window
  layers keep transformers' own bounded `DynamicSlidingWindowLayer` and are never compressed (their
  cache already holds at most the window). transformers builds one mask per layer kind, sized by
  the first layer of that kind: the full-attention mask from a `CompressedLayer` (slots stored,
  positions from tokens seen), the sliding one from a sliding layer, as without kvmerger.
* `check_supported` / `install_session`: which models the engine can drive, and the forward
  pre-hook that gives `generate()`'s cache our layers.

Nothing else in the package imports transformers' private modules.
"""

from __future__ import annotations

import contextvars
import copy
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from kvmerger.engine import kernels

if TYPE_CHECKING:
    from kvmerger.engine.session import CompressionSession

ATTENTION_NAME = "kvmerger"


class UnsupportedModelError(ValueError):
    """The model lacks something the compression engine needs; the message says what."""


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


class CompressedLayer(DynamicLayer):
    """A `DynamicLayer` whose stored slots may be fewer than the tokens it has seen.

    `get_seq_length()` returns the tokens seen, which transformers uses for the positions of new
    tokens; `get_mask_sizes()` describes the stored slots, shifted so that every stored slot lies
    before the first new query and is therefore visible to it.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen_tokens = 0
        self.slot_bias: torch.Tensor | None = None  # [batch, kv_heads, slots], float32
        self.compressed_slots = 0  # slots right after the last compression (0: never compressed)
        self.prefill_pending = False
        self.hold = None  # per-slot metadata while the engine holds the budget (engine.session.SlotMeta)
        self.slot_heads: torch.Tensor | None = None  # [batch, slots] uint8: packed layout, the KV head of each slot
        self.kv_heads = 0  # KV heads of a packed layer

    # -- what transformers asks ----------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if (self.slot_bias is not None or self.slot_heads is not None) and active_session() is None:
            held = "per-slot attention biases" if self.slot_bias is not None else "heads packed into one row"
            raise RuntimeError(
                f"This kvmerger cache holds {held}, which only kvmerger's attention "
                "function reads. Run the model inside `kvmerger.compress(model, method)`."
            )
        new_tokens = key_states.shape[-2]
        if self.packed:
            key_states, value_states = pack_heads(key_states), pack_heads(value_states)
            tags = torch.arange(self.kv_heads, dtype=torch.uint8, device=self.slot_heads.device).repeat(new_tokens)
            self.slot_heads = torch.cat([self.slot_heads, tags.expand(self.slot_heads.shape[0], -1)], dim=-1)
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.slot_bias is not None:  # new slots carry no bias (a packed layer: one per token and KV head)
            pad = self.slot_bias.new_zeros(*self.slot_bias.shape[:-1], new_tokens * (self.kv_heads if self.packed else 1))
            self.slot_bias = torch.cat([self.slot_bias, pad], dim=-1)
        session = active_session()
        self.prefill_pending = (
            session is not None and self.seen_tokens == 0 and new_tokens > 1 and session.handles_prefill
        )
        self.seen_tokens += new_tokens
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_slots
        return stored + query_length, self.seen_tokens - stored

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("CompressedLayer.crop takes a negative count of tokens to remove")
        remove = -tokens_to_remove
        if remove and self.hold is not None:
            raise ValueError("cannot crop a cache layer while the engine holds its budget during generation")
        appended = self.stored_slots - self.compressed_slots if self.compressed_slots else self.stored_slots
        if remove > appended:
            raise ValueError(
                f"cannot crop {remove} tokens: only the {appended} tokens appended after compression can be removed"
            )
        removed_slots = remove * (self.kv_heads if self.packed else 1)
        if remove and self.packed:
            super().crop(-removed_slots)
            self.slot_heads = self.slot_heads[..., :-removed_slots]
        else:
            super().crop(tokens_to_remove)
        if remove and self.slot_bias is not None:
            self.slot_bias = self.slot_bias[..., :-removed_slots]
        self.seen_tokens -= remove

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
        self.slot_bias = None
        self.compressed_slots = 0
        self.prefill_pending = False
        self.hold = None
        self.slot_heads = None
        self.kv_heads = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.slot_bias is not None:
            self.slot_bias = self.slot_bias.index_select(0, beam_idx.to(self.slot_bias.device))
        if self.slot_heads is not None:
            self.slot_heads = self.slot_heads.index_select(0, beam_idx.to(self.slot_heads.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.slot_bias is not None:
            self.slot_bias = self.slot_bias.repeat_interleave(repeats, dim=0)
        if self.slot_heads is not None:
            self.slot_heads = self.slot_heads.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.slot_bias is not None:
            self.slot_bias = self.slot_bias[indices, ...]
        if self.slot_heads is not None:
            self.slot_heads = self.slot_heads[indices, ...]

    # -- what the engine asks ------------------------------------------------------------------
    @property
    def stored_slots(self) -> int:
        """Slots stored per KV head (for a packed layer, the heads' average: its row over its KV heads)."""
        if not self.is_initialized or self.keys.numel() == 0:
            return 0
        return self.keys.shape[-2] // (self.kv_heads if self.packed else 1)

    @property
    def packed(self) -> bool:
        """Whether the heads share the layer's slots in one row (keys [B, 1, N, d], `slot_heads` [B, N])."""
        return self.slot_heads is not None

    def replace(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None,
        slot_heads: torch.Tensor | None = None,
        kv_heads: int = 0,
    ) -> None:
        """Swap the stored tensors for compressed ones; the tokens seen stay as they are. With
        `slot_heads` ([B, N] uint8) the tensors are a packed row [B, 1, N, d] of `kv_heads` heads, and a
        bias, if any, is one per packed slot [B, 1, N]."""
        packed_bias_ok = bias is None or tuple(bias.shape) == tuple(keys.shape[:3])
        if slot_heads is not None and (not packed_bias_ok or keys.shape[1] != 1 or kv_heads < 1):
            raise ValueError(
                "a packed layer holds keys [B, 1, N, d], at most one bias per slot [B, 1, N], and its count of KV heads"
            )
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self.slot_bias = None if bias is None else bias.float()
        self.slot_heads = slot_heads
        self.kv_heads = kv_heads if slot_heads is not None else 0
        self.compressed_slots = self.stored_slots
        self.prefill_pending = False

    def nbytes(self) -> int:
        """Bytes of the stored keys, values and per-slot biases."""
        if not self.is_initialized:
            return 0
        total = self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        for extra in (self.slot_bias, self.slot_heads):
            if extra is not None:
                total += extra.numel() * extra.element_size()
        return total


def pack_heads(states: torch.Tensor) -> torch.Tensor:
    """[B, H, n, d] -> [B, 1, n * H, d]: token by token, each token's heads in order (a packed layer's new slots)."""
    batch, heads, tokens, dim = states.shape
    return states.transpose(1, 2).reshape(batch, 1, tokens * heads, dim)


class CompressedCache(Cache):
    """A cache for `model(...)` or `generate()`: a `CompressedLayer` per full-attention layer, and
    transformers' own sliding-window layer per sliding-window layer (never compressed)."""

    def __init__(self, config: Any = None, num_layers: int | None = None, layers: list | None = None) -> None:
        if config is not None:
            layers = layers_for(config)
        elif num_layers is not None:
            layers = [CompressedLayer() for _ in range(num_layers)]
        if layers is None:
            super().__init__(layer_class_to_replicate=CompressedLayer)
        else:
            super().__init__(layers=layers)

    @classmethod
    def from_tensors(
        cls,
        layers: list[tuple | CacheLayerMixin],
        seen_tokens: int,
    ) -> CompressedCache:
        """A cache holding the given (keys, values, bias) per compressed layer, having seen `seen_tokens`
        ((keys, values, None, slot_heads, kv_heads) for a packed layer, `CompressedLayer.replace`).

        An item that is a cache layer instead (a sliding-window layer, which is never compressed) is
        taken over as a copy that shares its tensors (they are replaced, never written in place,
        when tokens are appended), so decoding from the new cache leaves the original alone.
        """
        built: list[CacheLayerMixin] = []
        for item in layers:
            if isinstance(item, CacheLayerMixin):
                built.append(copy.copy(item))
                continue
            layer = CompressedLayer()
            layer.replace(*item)
            layer.seen_tokens = seen_tokens
            layer.compressed_slots = layer.stored_slots if layer.stored_slots < seen_tokens else 0
            built.append(layer)
        return cls(layers=built)

    def fork(self) -> CompressedCache:
        """A new cache holding the same stored slots, to continue from this point more than once (several
        questions over one compressed prompt). The tensors are shared, not copied: a layer's update
        concatenates into new tensors and never writes into the stored ones."""
        layers: list[CacheLayerMixin] = []
        for theirs in self.layers:
            if not isinstance(theirs, CompressedLayer):  # a sliding-window layer: a copy sharing its tensors
                layers.append(copy.copy(theirs))
                continue
            mine = CompressedLayer()
            if theirs.is_initialized:
                mine.replace(theirs.keys, theirs.values, theirs.slot_bias, theirs.slot_heads, theirs.kv_heads)
            mine.seen_tokens = theirs.seen_tokens
            mine.compressed_slots = theirs.compressed_slots
            mine.hold = theirs.hold
            layers.append(mine)
        return CompressedCache(layers=layers)

    def nbytes(self) -> int:
        """Bytes of every layer's stored keys and values (and per-slot biases), compressed or not."""
        return sum(layer_nbytes(layer) for layer in self.layers)

    def slots(self) -> list[int]:
        """Slots stored per KV head, per layer (a sliding-window layer holds at most its window)."""
        return [layer_slots(layer) for layer in self.layers]


FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


def restorer(layer: CacheLayerMixin) -> Callable[[], None]:
    """A function that puts `layer` (the same object) back in its present state: for a sliding-window
    layer, which cannot be cropped back once a pass has slid it forward. Its tensors are shared, not
    copied: transformers' layers replace them when they grow, never write into them."""
    state = dict(vars(layer))

    def restore() -> None:
        vars(layer).clear()
        vars(layer).update(state)

    return restore


def is_compressed(layer: Any) -> bool:
    """Whether the engine compresses this cache layer (full attention) or leaves it as it is."""
    return isinstance(layer, CompressedLayer)


def layer_kind(layer: CacheLayerMixin) -> str:
    """The attention kind a cache layer serves: "full_attention" or "sliding_attention"."""
    return SLIDING_ATTENTION if getattr(layer, "is_sliding", False) else FULL_ATTENTION


def layer_nbytes(layer: CacheLayerMixin) -> int:
    if isinstance(layer, CompressedLayer):
        return layer.nbytes()
    if not layer.is_initialized or layer.keys is None:
        return 0
    return layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()


def layer_slots(layer: CacheLayerMixin) -> int:
    if isinstance(layer, CompressedLayer):
        return layer.stored_slots
    if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
        return 0
    return layer.keys.shape[-2]


def layer_kinds(config: Any) -> list[str]:
    """Each decoder layer's attention kind, "full_attention" or "sliding_attention".

    Raises `UnsupportedModelError` for any other kind, and for a model with no full-attention layer
    (there would be nothing to compress).
    """
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kinds = _layer_types(text_config)
    unsupported = [(i, kind) for i, kind in enumerate(kinds) if kind not in (FULL_ATTENTION, SLIDING_ATTENTION)]
    if unsupported:
        listed = ", ".join(f"layer {i}: {kind}" for i, kind in unsupported[:6])
        raise UnsupportedModelError(
            "kvmerger compresses full-attention layers and leaves sliding-window layers as transformers bounds "
            f"them; this model has other kinds: {listed}"
        )
    if FULL_ATTENTION not in kinds:
        window = getattr(text_config, "sliding_window", None)
        hint = ""
        if getattr(text_config, "layer_types", None) is None:
            hint = (
                "; if your prompts and answers fit in that window, set `model.config.sliding_window = None`: every "
                "layer then becomes full attention, with the same outputs"
            )
        raise UnsupportedModelError(
            f"every layer of this model is sliding-window attention (sliding_window={window}), whose cache "
            f"transformers already bounds to the window; kvmerger compresses full-attention layers only, so it "
            f"has nothing to compress here{hint}"
        )
    return kinds


def layers_for(config: Any) -> list[CacheLayerMixin]:
    """Fresh cache layers for `config`'s decoder: compressible ones for full attention, transformers'
    sliding-window layers (with the config's window) for sliding-window attention."""
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(text_config, "sliding_window", None)
    return [
        CompressedLayer() if kind == FULL_ATTENTION else DynamicSlidingWindowLayer(sliding_window=window)
        for kind in layer_kinds(config)
    ]


def _layer_types(text_config: Any) -> list[str]:
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, _ = get_layer_types_and_kwargs(text_config)
    return list(layer_types)


# --------------------------------------------------------------------------------------------
# The session that is active (one per thread of control)
# --------------------------------------------------------------------------------------------

_ACTIVE_SESSION: contextvars.ContextVar[CompressionSession | None] = contextvars.ContextVar(
    "kvmerger_active_session", default=None
)


def active_session() -> CompressionSession | None:
    return _ACTIVE_SESSION.get()


@contextmanager
def activated(session: CompressionSession) -> Iterator[None]:
    token = _ACTIVE_SESSION.set(session)
    try:
        yield
    finally:
        _ACTIVE_SESSION.reset(token)


# --------------------------------------------------------------------------------------------
# The registered attention function
# --------------------------------------------------------------------------------------------


def kvmerger_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, plus per-slot biases and the session's per-layer hooks.

    query: [batch, q_heads, q_len, head_dim]; key, value: [batch, kv_heads, kv_len, head_dim]
    (post-RoPE, exactly as the cache returned them). A prompt's prefill that the session compresses
    runs the same flash kernel as sdpa but keeps each row's log-normaliser for the scoring; tokens
    appended to a full cache whose session asks for the normaliser over a part of the keys
    (`Session.normaliser_part`, KVzip's repeat pass) get it from the same flash passes.
    """
    session = active_session()
    layer = session.layer_for(module, key) if session is not None else None
    lse = None
    if (
        layer is not None
        and layer.prefill_pending
        and scaling is not None
        and _can_keep_lse(module, query, key, value, attention_mask, dropout, kwargs)
    ):
        output, lse = _prefill_attention_with_lse(query, key, value, scaling)
    elif (
        layer is not None
        and not layer.packed
        and layer.slot_bias is None
        and (part := session.normaliser_part(module)) is not None
        and scaling is not None
        and _can_split_normaliser(query, key, value, attention_mask, dropout, kwargs)
    ):
        output, lse = _attention_with_part_lse(query, key, value, part, scaling)
    elif layer is not None and layer.packed:
        output = _packed_attention(
            query, key, value, layer.slot_heads, layer.kv_heads, layer.slot_bias, attention_mask, scaling, dropout, kwargs
        )
    else:
        position_bias = _query_head_bias(layer.slot_bias, query) if layer is not None else None
        if layer is not None and attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
            attention_mask = _mask_for_length(attention_mask, key.shape[-2])
        output, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, position_bias=position_bias, **kwargs
        )
    if layer is not None:
        session.after_attention(layer, module, query, key, value, scaling or module.scaling, lse)
    return output, None


def _can_keep_lse(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    kwargs: dict,
) -> bool:
    """Whether sdpa would run plain causal attention here, so the flash kernel gives the same output.

    That is a square causal prefill (no mask tensor, no dropout, no soft-capping or sliding window)
    on a device and dtype the kernel supports.
    """
    return (
        attention_mask is None
        and (kwargs["is_causal"] if kwargs.get("is_causal") is not None else getattr(module, "is_causal", True)) is True
        and query.shape[-2] == key.shape[-2] > 1
        and _plain_softmax_on_kernel(query, key, value, dropout, kwargs)
    )


def _plain_softmax_on_kernel(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, kwargs: dict
) -> bool:
    """No dropout, soft-capping or sliding window, equal head sizes and dtypes, on a device and dtype
    the flash kernel supports: what both lse-keeping paths need beyond their masks."""
    return (
        dropout == 0.0
        and kwargs.get("softcap") is None
        and kwargs.get("sliding_window") is None
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and query.dtype == key.dtype == value.dtype
        and kernels.available(query.device, query.dtype)
    )


def _can_split_normaliser(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
    dropout: float, kwargs: dict,
) -> bool:
    """Whether sdpa would run plain causal attention of appended tokens over every cached key here.

    That is queries appended to a full (unpadded, unpacked) cache: no mask or exactly the causal
    one (every cached key, then the own keys up to the query), no dropout, soft-capping or sliding
    window, on a device and dtype the kernel supports.
    """
    length, total = query.shape[-2], key.shape[-2]
    if not (total > length and _plain_softmax_on_kernel(query, key, value, dropout, kwargs)):
        return False
    if attention_mask is None:
        return True
    if attention_mask.dtype != torch.bool or attention_mask.shape[-2:] != (length, total):
        return False
    rows = torch.arange(length, device=query.device).unsqueeze(1) + (total - length)
    causal = torch.arange(total, device=query.device).unsqueeze(0) <= rows
    return bool((attention_mask == causal).all())


def _attention_with_part_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, part: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Appended tokens' attention in transformers' layout [B, n, Hq, d], and their lse [B, Hq, n] over
    the cached keys `part` and their own keys (`kernels.attention_with_part_lse`)."""
    group = query.shape[1] // key.shape[1]
    output, lse = kernels.attention_with_part_lse(query, repeat_kv(key, group), repeat_kv(value, group), part, scaling)
    return output.transpose(1, 2).contiguous(), lse


def _prefill_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefill's causal attention in transformers' output layout [B, T, Hq, d], and its lse [B, Hq, T]."""
    group = query.shape[1] // key.shape[1]
    output, lse = kernels.causal_attention_with_lse(
        query, repeat_kv(key, group), repeat_kv(value, group), scaling
    )
    return output.transpose(1, 2).contiguous(), lse


def _packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_heads: torch.Tensor,
    kv_heads: int,
    slot_bias: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    kwargs: dict,
) -> torch.Tensor:
    """Attention over a packed layer, in transformers' output layout [B, q_len, q_heads, d].

    key, value: [B, 1, N, d], the heads' slots in one row, `slot_heads` [B, N] tagging each; the
    last ``q_len * kv_heads`` slots are this pass's tokens (`pack_heads`). Every (query head, query)
    pair becomes one row of a single sdpa call over the whole row, masked to its KV head's slots and,
    among this pass's tokens, to the causal (and padding) block of transformers' mask; `slot_bias`
    ([B, 1, N] float32, or None) is added to every row's logits of those slots. The arithmetic
    is ``kv_heads`` times that of a dense layer of the same average length; the memory is the slots kept.
    """
    if dropout or kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise UnsupportedModelError(
            "a layer whose heads share the budget supports plain softmax attention only (no dropout, logit "
            "soft-capping or sliding window); use head_budget='equal' with this model"
        )
    batch, q_heads, q_len, dim = query.shape
    slots, new_slots = key.shape[-2], q_len * kv_heads
    row_heads = torch.arange(q_heads, device=query.device) // (q_heads // kv_heads)
    own_head = slot_heads.long().unsqueeze(1) == row_heads.view(1, q_heads, 1)  # [B, Hq, N]
    if attention_mask is None:
        block = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).tril().expand(batch, q_len, q_len)
    else:
        block = attention_mask[:, 0, :, -q_len:]
        block = block if block.dtype == torch.bool else block == 0
        block = block.expand(batch, q_len, q_len)
    newest = block.repeat_interleave(kv_heads, dim=-1).unsqueeze(1)  # [B, 1, q_len, new_slots]: token by token
    visible = torch.cat(
        [
            own_head[..., : slots - new_slots].unsqueeze(2).expand(-1, -1, q_len, -1),
            own_head[..., slots - new_slots :].unsqueeze(2) & newest,
        ],
        dim=-1,
    )
    mask = visible.reshape(batch, 1, q_heads * q_len, slots)
    if slot_bias is not None:
        bias = slot_bias.to(query.dtype).unsqueeze(2)  # [B, 1, 1, N]
        mask = torch.where(mask, bias, torch.full_like(bias, float("-inf")))
    output = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(batch, 1, q_heads * q_len, dim), key, value, attn_mask=mask, scale=scaling
    )
    return output.reshape(batch, q_heads, q_len, -1).transpose(1, 2).contiguous()


def _mask_for_length(mask: torch.Tensor, kv_length: int) -> torch.Tensor:
    """Resize the full-attention mask, built for the first such layer's slots, to a layer holding `kv_length`.

    transformers builds one full-attention mask from the first full-attention layer's sizes; layers
    compressed to other lengths (paper mode) need their own. Only full-attention layers come here
    (sliding-window layers keep transformers' own mask): every stored slot is visible (padding slots
    of a padded batch are masked by their -inf bias, engine.padding) and the new tokens keep their
    causal block.
    """
    new_tokens = mask.shape[-2]
    stored = kv_length - new_tokens
    visible = torch.ones(*mask.shape[:-1], stored, dtype=torch.bool, device=mask.device)
    if mask.dtype != torch.bool:
        visible = torch.zeros(visible.shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([visible, mask[..., -new_tokens:]], dim=-1)


def _query_head_bias(slot_bias: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
    """[batch, kv_heads, slots] -> [batch, q_heads, 1, slots], in the query's dtype.

    All-zero biases are skipped, so that such a cache runs exactly the plain sdpa path.
    """
    if slot_bias is None or not bool(slot_bias.any()):
        return None
    group = query.shape[1] // slot_bias.shape[1]
    return slot_bias.repeat_interleave(group, dim=1).unsqueeze(2).to(query.dtype)


def register_attention() -> None:
    """Make ``attn_implementation="kvmerger"`` known to transformers (idempotent)."""
    ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, kvmerger_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


# --------------------------------------------------------------------------------------------
# Models: what we support, and how a session attaches to one
# --------------------------------------------------------------------------------------------


def check_supported(model: torch.nn.Module) -> None:
    """Raise `UnsupportedModelError` naming what is missing if the engine cannot drive `model`."""
    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(f"{name} is not a transformers PreTrainedModel")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model; kvmerger handles decoder-only models")
    if not model._can_set_attn_implementation() or not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{name} does not dispatch its attention through transformers' AttentionInterface "
            "(`_supports_attention_backend`), so kvmerger cannot see its query and key states"
        )
    text_config = config.get_text_config(decoder=True)
    for field in ("num_attention_heads", "num_hidden_layers"):
        if getattr(text_config, field, None) is None:
            raise UnsupportedModelError(f"{name}'s config has no `{field}`")
    layer_kinds(config)
    if not attention_modules(model):
        raise UnsupportedModelError(f"{name} has no attention modules with a `layer_idx` attribute")


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        module
        for module in model.modules()
        if isinstance(getattr(module, "layer_idx", None), int) and hasattr(module, "scaling")
    ]


@contextmanager
def install_session(model: PreTrainedModel, session: CompressionSession) -> Iterator[None]:
    """Route `model`'s attention through kvmerger and give every forward pass a kvmerger cache.

    Sessions nest: inside another session's block (the engine's own second passes, such as KVzip's
    reconstruction, run from a session's hook), only the innermost session's hooks act. On exit the
    attention implementation and the hooks are restored, whatever happened inside.
    """
    register_attention()
    previous = model.config._attn_implementation
    handle = model.register_forward_pre_hook(_make_pre_hook(session), with_kwargs=True)
    post = model.register_forward_hook(_make_post_hook(session), with_kwargs=True)
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        with activated(session):
            yield
    finally:
        handle.remove()
        post.remove()
        model.set_attn_implementation(previous)


def _make_pre_hook(session: CompressionSession) -> Callable:
    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if active_session() is not session:
            return args, kwargs
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        key = "cache" if "cache" in kwargs or "past_key_values" not in kwargs else "past_key_values"
        cache = kwargs.get(key)
        use_cache = kwargs.get("use_cache", module.config.use_cache)
        if cache is None and use_cache is not False:
            cache = CompressedCache(module.config)
        if cache is not None:
            cache = _as_compressed_cache(cache, module.config)
            kwargs[key] = cache
        token_ids = inputs if isinstance(inputs, torch.Tensor) and not inputs.is_floating_point() else None
        session.begin_forward(cache, None if inputs is None else inputs.shape[1], token_ids, kwargs.get("attention_mask"))
        return args, kwargs

    return pre_hook


def _make_post_hook(session: CompressionSession) -> Callable:
    def post_hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if active_session() is session:
            session.end_forward()
        return output

    return post_hook


def rotary_tables(model: PreTrainedModel) -> Callable[[int], Callable] | None:
    """`for_layer(layer_idx)(positions [n]) -> (cos, sin)` [n, d] float32 from the model's own rotary
    embedding (attention scaling included; the layer's type chosen where the model has several, as
    Gemma 3 does), or None if the model has none where transformers puts it."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        return None
    takes_layer_type = "layer_type" in inspect.signature(rotary.forward).parameters
    layer_types = _layer_types(model.config.get_text_config(decoder=True)) if takes_layer_type else []
    device = next(model.parameters()).device

    def for_layer(layer_idx: int) -> Callable:
        extra = {"layer_type": layer_types[layer_idx]} if takes_layer_type else {}

        def tables(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            probe = torch.empty(0, dtype=torch.float32, device=device)
            cos, sin = rotary(probe, positions.to(device).unsqueeze(0), **extra)
            return cos[0].float(), sin[0].float()

        return tables

    return for_layer


def _as_compressed_cache(cache: Cache, config: Any) -> Cache:
    """Give an empty transformers cache kvmerger's layers, in place, so callers' references stay valid.

    A cache already laid out for this model (a `CompressedLayer` exactly where the layer is full
    attention) is used as it is; an empty `CompressedCache` or `DynamicCache` gets fresh layers.
    """
    if not isinstance(cache, CompressedCache) and type(cache) is not DynamicCache:
        raise ValueError(
            f"kvmerger cannot compress a {type(cache).__name__}; pass a kvmerger.CompressedCache, a DynamicCache "
            "or no cache at all"
        )
    kinds = layer_kinds(config)
    laid_out = len(cache.layers) == len(kinds) and all(
        is_compressed(layer) == (kind == FULL_ATTENTION) for layer, kind in zip(cache.layers, kinds)
    )
    if laid_out:
        cache.layer_class_to_replicate = None
        return cache
    if any(layer_slots(layer) for layer in cache.layers):
        raise ValueError(
            f"the {type(cache).__name__} passed in already holds tokens in layers kvmerger did not lay out; start "
            "from an empty cache (or a CompressedCache) so that kvmerger can compress the prompt"
        )
    cache.layers = layers_for(config)
    cache.layer_class_to_replicate = None
    return cache
