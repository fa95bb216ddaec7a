"""Attention for padding-free packed batches: each document attends only to itself, without a dense mask.

A packed batch is one flattened row of documents with per-document position ids; TRL's collator adds their
boundaries (`cu_seq_lens_q`/`cu_seq_lens_k`, `max_length_q`/`max_length_k`). Transformers' `sdpa` turns such a row
into a dense block-diagonal mask over the whole row, which rules out the flash kernel and grows with chunk_size
squared. The implementations here avoid that:

- `varlen`: torch's variable-length flash attention (`torch.nn.attention.varlen.varlen_attn`) over the document
  boundaries; CUDA only. Batches without boundaries (unpacked training, validation, generation) take `sdpa`.
- `flex_attention`: transformers' flex attention, whose block mask skips the blocks between documents.

`choose` picks `varlen` on CUDA and `sdpa` on the CPU, where a run is a test or a benchmark.
"""

from __future__ import annotations

from typing import Any

VARLEN = "varlen"
# Every implementation a base model can be loaded with; the CPU can run all but `varlen`.
IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", VARLEN)


def varlen_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    *,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention interface: (batch, heads, tokens, head_dim) in, (batch, tokens, heads, head_dim) out."""
    from torch.nn.attention import varlen
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        output: tuple[Any, None] = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        return output
    # One flattened row: (1, heads, tokens, head_dim) -> (tokens, heads, head_dim).
    query, key, value = (tensor[0].transpose(0, 1) for tensor in (query, key, value))
    heads, kv_heads = query.shape[1], key.shape[1]
    attended: Any = varlen.varlen_attn(
        query,
        key,
        value,
        cu_seq_lens.to(device=query.device, dtype=_int32()),
        kwargs.get("cu_seq_lens_k", cu_seq_lens).to(device=query.device, dtype=_int32()),
        int(kwargs["max_length_q"]),
        int(kwargs.get("max_length_k", kwargs["max_length_q"])),
        scale=scaling,
        window_size=(-1, 0),  # causal within each document
        enable_gqa=heads != kv_heads,
    )
    return attended.unsqueeze(0), None


def _int32() -> Any:
    import torch

    return torch.int32


def _varlen_mask(**kwargs: Any) -> Any:
    """No mask for a padding-free row (the boundaries carry it); padded batches get sdpa's mask for the fallback."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(**kwargs)


def register() -> None:
    """Make `varlen` an attention implementation transformers models can be loaded with."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)


def choose(cuda: bool) -> str:
    return VARLEN if cuda else "sdpa"
