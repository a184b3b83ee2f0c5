"""Chunked prefill: a long prompt goes through the model a chunk at a time.

Each chunk attends to the already-compressed prefix (the chunk before it still in full precision)
plus itself; the nexusquant attention then scores and compresses what the next chunk no longer
needs exactly, so the full-precision KV of the whole prompt never exists at once (one-shot prefill
holds all of it until the end of the forward). Two ways in:

    with nexusquant_evict(model, quality="high", chunk_size=1024):
        out = model.generate(input_ids, max_new_tokens=64)     # the prompt is prefilled in chunks

    cache = NexusQuantCache(model, preset="high")            # a cache managed by hand
    out = prefill(model, input_ids, cache, chunk_size=1024)   # out.logits: the last position's

What chunking changes for the compressor (docs/EVAL.md has the measured cost):

- what a chunk sees: the chunk before it in full precision (each layer keeps the newest chunk
  exact until the next one has attended to it: the full-precision working set is two chunks), and
  older tokens through their codes (dequantized), so later chunks already see quantization error
  that one-shot prefill only shows to generated tokens;
- scoring: a chunk's tokens are ranked by the next chunk's last ``score_window`` queries (the
  last chunk's by its own), not by the prompt's last queries; tokens already compressed are not
  ranked again;
- budgets: ``evict`` and ``demote`` are fractions of each chunk's tokens, not of the whole prompt,
  so every part of a long prompt keeps the same share;
- the transform coder (``key_codec="pca"``), with ``recode_prompt`` (the default): a layer coded
  below `high`'s rates holds the chunks at the staging rates (5 bits per key element, 4-bit values)
  in a basis fitted on the first chunk while the prompt is read; when its last chunk has been read,
  each layer decodes them and codes the whole prompt at the settings' rates, with a basis fitted
  on all of it, the second moment of every prompt query as its metric and the prompt's mean as its
  centre, as one forward over the prompt would. Later chunks so build on a fine code of the
  prefix, and the cache holds the staged codes' bytes until the prompt ends (measured before the
  last of four chunks: 1.72x the codes `balanced` holds without staging, 2.35x `max`'s;
  ``benches/staged_bytes.py``). At 4096 tokens in chunks of 1024 `balanced` measured within 0.2
  points of one forward, `max` 0.7 (5.5 without it; docs/EVAL.md). `high` is not staged. Without
  it, or at `high`'s rates, every chunk is coded at the settings' rates in the first chunk's basis
  (fitted with the next chunk's queries as its metric) and centre; its budget spreads the basis's
  bytes over the whole prompt, as a one-shot prefill does.
"""

from __future__ import annotations

import contextvars
import operator
from typing import Any, Callable, Optional

import torch

from ._core import NexusQuantError
from .compat import cache_kwarg

__all__ = [
    "prefill",
    "recode_prompt",
    "check_chunk_size",
    "forward_in_chunks",
    "held_for_next_chunk",
    "held_while_prefilling",
    "prompt_tokens_in_prefill",
]

# While a chunked prefill runs: (chunk size, whether this forward is the last chunk, the prompt's
# tokens, whether transform-coded layers stage the chunks and code the prompt again at its end).
# A layer keeps the newest chunk in full precision until the next chunk has attended to it, so
# every chunk sees the chunk before it exactly and only older tokens through their codes
# (measured: docs/EVAL.md).
_PREFILL: contextvars.ContextVar[Optional[tuple[int, bool, int, bool]]] = contextvars.ContextVar(
    "nexusquant_chunked_prefill", default=None
)


def held_for_next_chunk() -> int:
    """Newest tokens a layer keeps exact when it compresses after a forward's attention: the
    chunk just seen, unless it is the prompt's last chunk or no chunked prefill runs."""
    state = _PREFILL.get()
    return 0 if state is None or state[1] else state[0]


def prompt_tokens_in_prefill() -> int:
    """Tokens of the prompt a chunked prefill is running over (0 when none runs). The transform
    coder fits its basis on the first chunk and codes the rest of the prompt in it, so it spreads the
    basis's bytes over the whole prompt, as a one-shot prefill of that prompt does."""
    state = _PREFILL.get()
    return 0 if state is None else state[2]


def recode_prompt() -> bool:
    """Whether a chunked prefill runs whose transform-coded layers hold the chunks at the staging
    rates and code the whole prompt again once it is read (``recode_prompt``)."""
    state = _PREFILL.get()
    return state is not None and state[3]


def held_while_prefilling() -> int:
    """Newest tokens a layer keeps exact when it catches up with the previous forward at the start
    of the next one (attention not through nexusquant): the previous chunk, while a chunked prefill
    runs (the chunk about to run has not seen it yet)."""
    state = _PREFILL.get()
    return 0 if state is None else state[0]


# Forward arguments a chunked forward cannot honour: they ask for per-token outputs of the whole
# prompt in one piece, or a loss over it.
_REFUSED = ("labels", "output_attentions", "output_hidden_states")


def check_chunk_size(chunk_size: Any) -> Optional[int]:
    """``chunk_size`` as an int (None: no chunking); anything but a positive integer is refused."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool):
        raise NexusQuantError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    try:
        value = operator.index(chunk_size)
    except TypeError:
        raise NexusQuantError(f"chunk_size must be a positive integer, got {chunk_size!r}") from None
    if value < 1:
        raise NexusQuantError(f"chunk_size must be a positive integer, got {value}")
    return value


def check_recode(recode_prompt: Any) -> bool:
    """``recode_prompt`` as a bool; anything but True or False is refused."""
    if not isinstance(recode_prompt, bool):
        raise NexusQuantError(f"recode_prompt must be True or False, got {recode_prompt!r}")
    return recode_prompt


def _prompt_length(kwargs: dict[str, Any]) -> int:
    ids = kwargs.get("input_ids")
    if isinstance(ids, torch.Tensor):
        return ids.shape[-1]
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor):
        return embeds.shape[1]
    return 0


def wants_chunks(kwargs: dict[str, Any], chunk_size: Optional[int]) -> bool:
    """Whether a forward with these arguments is a prompt longer than one chunk that fills a cache."""
    return chunk_size is not None and kwargs.get("use_cache") is not False and _prompt_length(kwargs) > chunk_size


def _keep_of_chunk(keep: int, start: int, end: int, total: int) -> int:
    """How many of chunk ``[start, end)``'s positions are among the last ``keep`` of ``total``
    (``keep`` 0: all of them)."""
    if keep == 0:
        return end - start
    return max(0, min(end - start, end - (total - keep)))


def forward_in_chunks(
    forward: Callable[..., Any],
    kwargs: dict[str, Any],
    chunk_size: int,
    cache_name: str,
    before_chunk: Optional[Callable[[Optional[torch.Tensor]], None]] = None,
    progress: bool = False,
    recode: bool = True,
) -> Any:
    """Run ``forward(**kwargs)`` (a causal LM's forward over a prompt) as one forward per chunk of
    ``chunk_size`` tokens with the same cache. Returns the last chunk's output, its ``logits``
    those of the positions the caller asked for (``logits_to_keep``: the last k, or 0 for all).

    ``before_chunk(ids)`` runs before each chunk with that chunk's token ids (None for embeddings);
    ``recode``: see :func:`prefill`'s ``recode_prompt``.
    """
    refused = [name for name in _REFUSED if kwargs.get(name) is not None and kwargs[name] is not False]
    if refused:
        raise NexusQuantError(f"a chunked prefill cannot return {', '.join(refused)}: prefill without chunk_size")
    cache = kwargs.get(cache_name)
    if cache is None:
        raise NexusQuantError("a chunked prefill needs a cache: pass one, or call it inside generate")
    total = _prompt_length(kwargs)
    past = cache.get_seq_length()
    keep = kwargs.get("logits_to_keep", 0)
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
        raise NexusQuantError(f"a chunked prefill takes logits_to_keep as an integer >= 0, got {keep!r}")
    mask = kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        raise NexusQuantError("a chunked prefill takes a 2D attention_mask (batch, past + prompt tokens)")
    if mask is not None and mask.shape[-1] != past + total:
        raise NexusQuantError(
            f"attention_mask covers {mask.shape[-1]} tokens, the cache holds {past} and the prompt {total}"
        )
    positions = kwargs.get("position_ids")
    cache_position = kwargs.get("cache_position")
    if cache_position is None:
        tokens = kwargs.get("input_ids")
        device = (tokens if isinstance(tokens, torch.Tensor) else kwargs["inputs_embeds"]).device
        cache_position = torch.arange(past, past + total, device=device)

    bounds = [(s, min(s + chunk_size, total)) for s in range(0, total, chunk_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm  # a dependency of transformers

        bar = tqdm(total=total, unit="tok", desc="prefill")
    pieces, out = [], None
    try:
        for start, end in bounds:
            part = dict(kwargs)
            for name in ("input_ids", "inputs_embeds"):
                if isinstance(kwargs.get(name), torch.Tensor):
                    part[name] = kwargs[name][:, start:end]
            if mask is not None:
                part["attention_mask"] = mask[:, : past + end]
            if isinstance(positions, torch.Tensor):
                part["position_ids"] = positions[..., start:end]
            part["cache_position"] = cache_position[start:end]
            part["return_dict"] = True  # the logits are read by name
            wanted = _keep_of_chunk(keep, start, end, total)
            # Chunks before the kept positions still compute one row of logits (0 would mean all).
            part["logits_to_keep"] = wanted if wanted > 0 else 1
            if before_chunk is not None:
                before_chunk(part.get("input_ids"))
            token = _PREFILL.set((chunk_size, end == total, total, recode))
            try:
                out = forward(**part)
            finally:
                _PREFILL.reset(token)
            if wanted > 0:
                pieces.append(out.logits[:, -wanted:])
            if bar is not None:
                bar.update(end - start)
    finally:
        if bar is not None:
            bar.close()
    assert out is not None  # total > 0: at least one chunk ran
    out.logits = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
    return out.to_tuple() if kwargs.get("return_dict") is False else out


def prefill(
    model: torch.nn.Module,
    input_ids: Optional[torch.Tensor],
    cache: Any,
    *,
    chunk_size: int = 1024,
    attention_mask: Optional[torch.Tensor] = None,
    inputs_embeds: Optional[torch.Tensor] = None,
    logits_to_keep: int = 1,
    progress: bool = False,
    recode_prompt: bool = True,
    **forward_kwargs: Any,
) -> Any:
    """Prefill ``cache`` with a prompt, ``chunk_size`` tokens per forward.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM.
    input_ids : torch.Tensor or None
        ``(B, T)`` token ids (or None with ``inputs_embeds``).
    cache : transformers.Cache
        The cache to fill, typically a :class:`~nexusquant.cache.NexusQuantCache`; it may already
        hold a prefix.
    chunk_size : int
        Tokens per forward.
    attention_mask : torch.Tensor or None
        ``(B, past + T)``, 1 for real tokens (left padding).
    logits_to_keep : int
        Logits returned for the last this many positions (0: every position; the full logits of a
        long prompt are large: vocabulary x tokens x 4 bytes).
    progress : bool
        Show a progress bar over the prompt's tokens.
    recode_prompt : bool
        Transform-coded layers hold the chunks at the staging rates and code the whole prompt at
        the settings' rates once it is read (the module docstring says what it costs); False: each
        chunk at the settings' rates in the first chunk's basis (less memory while prefilling).

    Returns
    -------
    The model's output of the last chunk, ``logits`` of the kept positions ``(B, k, V)``.
    """
    size = check_chunk_size(chunk_size)
    assert size is not None
    if (input_ids is None) == (inputs_embeds is None):
        raise NexusQuantError("prefill takes input_ids or inputs_embeds (one of them)")
    kwargs: dict[str, Any] = dict(forward_kwargs)
    kwargs.update(use_cache=True, logits_to_keep=logits_to_keep, attention_mask=attention_mask)
    if input_ids is not None:
        kwargs["input_ids"] = input_ids
    else:
        kwargs["inputs_embeds"] = inputs_embeds
    name = cache_kwarg(model)
    kwargs[name] = cache
    if _prompt_length(kwargs) == 0:
        raise NexusQuantError("prefill needs at least one token")
    return forward_in_chunks(model, kwargs, size, name, progress=progress, recode=check_recode(recode_prompt))
