"""The methods a user would pick instead of nexusquant, run in the same process on the same inputs.

Eviction presses (reimplemented, see below) run through nexusquant's own cache with 16-bit tiers,
so their bytes are counted exactly like ours; quantized caches are transformers' ``QuantizedCache``
(optimum-quanto and HQQ backends, used from those libraries) and a plain per-token integer cache.

Why reimplemented: kvpress 0.5.5 pins ``transformers < 5.3`` and we run 5.24, so its presses cannot be
imported here. Each scorer below follows kvpress's press of the same name (read from its source,
not copied) and the paper it cites; the differences are listed in each docstring. All four are
registered as nexusquant scorers (``scorer="snapkv"`` ...) by :func:`register_peers` (the
evaluation calls it; importing this module changes no registry), and run
with ``key_bits=value_bits=16`` (nothing quantized), ``center=False``, ``recent_window=1``,
``pool_kernel=1``. kvpress keeps ``int(n * (1 - ratio))`` tokens per head by top-k over scores; the
cache keeps ``round(n * (1 - evict))`` per head by the same ranking (sinks and the last token count
towards it), so the kept sets agree up to one token of rounding.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .._core import NexusQuantError
from ..architecture import attention_modules, layer_plan
from ..cache import NexusQuantLayer, compression_stats
from ..rope import RopeAdapter
from ..scoring import ScoreInputs, register_scorer

__all__ = [
    "snapkv_scores",
    "expected_attention_scores",
    "knorm_scores",
    "streamingllm_scores",
    "PEER_SCORERS",
    "PEER_SINKS",
    "attach_rotary",
    "PerTokenIntLayer",
    "PerTokenIntCache",
    "held_nbytes",
]

# kvpress defaults.
SNAPKV_WINDOW = 64
SNAPKV_KERNEL = 5
EA_FUTURE_POSITIONS = 512
EA_SINKS = 4
STREAMING_SINKS = 4


def _require_unpadded(x: ScoreInputs, name: str) -> None:
    if not bool(x.window_valid.all()):
        raise NexusQuantError(f"the {name} peer scorer supports unpadded prompts only (the evaluation runs batch 1)")


def snapkv_scores(x: ScoreInputs) -> torch.Tensor:
    """SnapKV (Li et al. 2024, arXiv:2404.14469) as kvpress's ``SnapKVPress`` computes it.

    The last ``window_size=64`` queries (post-RoPE, the model's own) attend to every prompt key with
    a causal mask, softmax in float32; the attention paid to the keys before the window is averaged
    over those queries, average-pooled along tokens (kernel 5, zero padding counted, as
    ``F.avg_pool1d`` does by default), averaged over the query heads of each KV head, and the window
    itself scores above every other token (``max + 1``, rising towards the newest token so that a budget
    smaller than the window keeps its newest part; kvpress ties them). Scale: the model's attention scale (kvpress uses
    ``1/sqrt(head_dim)``, the same for Llama-style models). Returns ``(B, H_kv, window)``.
    """
    _require_unpadded(x, "snapkv")
    key = x.key[:, :, -x.window :].float()
    b, hkv, t, d = key.shape
    hq = x.query.shape[1]
    g = hq // hkv
    w = min(SNAPKV_WINDOW, t - 1)
    if w < 1:
        return torch.zeros(b, hkv, t, device=key.device)
    q = x.query[:, :, -w:].float().reshape(b, hkv, g * w, d)
    logits = torch.matmul(q, key.transpose(-1, -2)) * x.scaling  # (B, Hkv, g*w, T)
    qi = torch.arange(w, device=key.device)[:, None] + (t - w)
    causal = torch.arange(t, device=key.device)[None, :] <= qi  # (w, T)
    logits = logits.reshape(b, hkv, g, w, t).masked_fill(~causal, float("-inf"))
    probs = torch.softmax(logits, dim=-1)[..., : t - w]  # (B, Hkv, g, w, T - w)
    scores = probs.mean(dim=3)  # mean over the window's queries -> (B, Hkv, g, T - w)
    scores = F.avg_pool1d(scores.reshape(b * hkv * g, 1, t - w), SNAPKV_KERNEL, stride=1, padding=SNAPKV_KERNEL // 2)
    scores = scores.reshape(b, hkv, g, t - w).mean(dim=2)
    # The window scores above everything else. kvpress gives it one tied value, so when the budget is
    # smaller than the window, top-k picks an arbitrary part of it; here the newest tokens win ties
    # (SnapKV itself always keeps the whole window).
    top = float(scores.max().item()) + 1.0
    ramp = top + torch.arange(w, device=key.device, dtype=torch.float32) / w
    return torch.cat([scores, ramp.expand(b, hkv, w)], dim=-1)


# attention module -> the model's rotary embedding module (ExpectedAttention rotates query
# statistics to future positions with it). Weak keys: nothing is attached to the user's model.
_ROTARY: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()


def attach_rotary(model: torch.nn.Module) -> None:
    """Remember the model's rotary embedding for each attention module (for ``expected-attention``).

    Raises NexusQuantError when the model has no rotary embedding or several (local/global).
    """
    rotary = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(rotary) != 1:
        raise NexusQuantError(
            "the expected-attention peer needs exactly one rotary embedding module, "
            f"{type(model).__name__} has {len(rotary)}"
        )
    for m in attention_modules(model):
        _ROTARY[m] = rotary[0]


def _rotary_angles(module: torch.nn.Module, positions: torch.Tensor, like: torch.Tensor):
    rotary = _ROTARY.get(module)
    if rotary is None:
        raise NexusQuantError("expected-attention: call nexusquant.eval.peers.attach_rotary(model) first")
    return rotary(like, positions[None, :])  # (cos, sin), (1, T, R) each


_ROTATION_MEMO: dict[tuple, torch.Tensor] = {}  # one entry: (rotary module, start, ...) -> R^T


def _mean_future_rotation(
    module: torch.nn.Module, adapter: RopeAdapter, start: int, d: int, device: torch.device
) -> torch.Tensor:
    """``R^T`` with ``R`` the rotary rotation averaged over positions ``start .. start + 512``.

    Each basis vector e_i is rotated at every future position p with the model's own code; row i of
    the mean is ``(mean_p R_p) e_i``, so the mean is ``R^T``. Every layer of a forward shares the
    rotary module and positions, so the last result is memoised.
    """
    rotary = _ROTARY.get(module)
    memo_key = (rotary, start, d, str(device), adapter.kind, adapter.rotary_dim)
    hit = _ROTATION_MEMO.get(memo_key)
    if hit is not None:
        return hit
    f_pos = torch.arange(start, start + EA_FUTURE_POSITIONS, device=device)
    basis = torch.eye(d, device=device, dtype=torch.float32)
    fcos, fsin = _rotary_angles(module, f_pos, basis)
    f, r = f_pos.shape[0], fcos.shape[-1]
    e = basis[None, :, None, :].expand(1, d, f, d)
    rt = adapter.rotate(e, fcos[:, None].expand(1, d, f, r), fsin[:, None].expand(1, d, f, r)).mean(dim=2)[0]
    _ROTATION_MEMO.clear()
    _ROTATION_MEMO[memo_key] = rt
    return rt


def expected_attention_scores(x: ScoreInputs) -> torch.Tensor:
    """Expected Attention (Devoto et al. 2025, arXiv:2510.00636) as kvpress's ``ExpectedAttentionPress``.

    Statistics of future queries: the mean ``mu`` and covariance ``S`` of the prompt's pre-RoPE
    queries (all but the first ``n_sink=4``), per query head, rotated by the rotary embedding averaged
    over the next ``n_future_positions=512`` positions (``R = mean_p R_p``; ``mu <- R mu``,
    ``S <- R S R^T``). A key's expected attention is ``exp(s mu.k + s^2/2 k^T S k)`` (``s`` the
    attention scale), softmax-normalised over the non-sink keys, averaged over each KV head's query
    group, times ``||v||`` (``use_vnorm``, ``epsilon=0``); sinks get ``max + 1``.

    Differences from kvpress: the pre-RoPE queries are recovered by undoing the model's rotary
    embedding on the real queries (kvpress recomputes them from the hidden states; same values up to
    rounding), ``R_p`` is obtained by rotating basis vectors with the model's own
    ``apply_rotary_pos_emb`` (kvpress builds it for the split-half layout only; identical there),
    and the arithmetic is float32 throughout.
    """
    _require_unpadded(x, "expected-attention")
    layer, module = x.layer, x.module
    key = x.key[:, :, -x.window :].float()
    value = x.value[:, :, -x.window :].float()
    b, hkv, t, d = key.shape
    query = x.query.float()
    hq, q_len = query.shape[1], query.shape[2]
    g = hq // hkv
    if t <= EA_SINKS or q_len <= EA_SINKS:
        return torch.zeros(b, hkv, t, device=key.device)
    adapter = RopeAdapter(module)
    seen = layer.seen
    q_pos = torch.arange(seen - q_len, seen, device=key.device)
    cos, sin = _rotary_angles(module, q_pos, query)
    r = cos.shape[-1]
    pre = adapter.rotate(
        query, cos[:, None].expand(b, hq, q_len, r), sin[:, None].expand(b, hq, q_len, r), inverse=True
    )
    pre = pre[:, :, EA_SINKS:]
    mu = pre.mean(dim=2)  # (B, Hq, D)
    centred = pre - mu[:, :, None]
    cov = torch.einsum("bhsi,bhsj->bhij", centred, centred) / pre.shape[2]  # (B, Hq, D, D)

    rt = _mean_future_rotation(module, adapter, seen, d, key.device)
    mu = mu @ rt  # R mu, as rows
    cov = rt.transpose(0, 1) @ cov @ rt  # R S R^T

    k = key[:, :, EA_SINKS:]  # (B, Hkv, T', D)
    kq = k[:, :, None].expand(b, hkv, g, t - EA_SINKS, d).reshape(b, hq, t - EA_SINKS, d)
    s = x.scaling
    logits = torch.einsum("bhd,bhtd->bht", mu, kq) * s
    logits = logits + 0.5 * s * s * torch.einsum("bhti,bhij,bhtj->bht", kq, cov, kq)
    scores = torch.softmax(logits, dim=-1).reshape(b, hkv, g, t - EA_SINKS).mean(dim=2)
    scores = scores * value[:, :, EA_SINKS:].norm(dim=-1)
    return F.pad(scores, (EA_SINKS, 0), value=float(scores.max().item()) + 1.0)


def knorm_scores(x: ScoreInputs) -> torch.Tensor:
    """Knorm (Devoto et al. 2024, arXiv:2406.11430) as kvpress's ``KnormPress``: keep the keys of
    lowest L2 norm (score ``-||k||``); nothing else is protected. Returns ``(B, H_kv, window)``."""
    return -x.key[:, :, -x.window :].float().norm(dim=-1)


def streamingllm_scores(x: ScoreInputs) -> torch.Tensor:
    """StreamingLLM (Xiao et al. 2023, arXiv:2309.17453) as kvpress's ``StreamingLLMPress``: the first
    ``n_sink=4`` tokens (kept by the cache's ``sink_tokens``) and the most recent tokens; the score is
    the token's index, so the newest win. Like kvpress's press (without ``KeyRerotationPress``), kept
    keys keep their original positions. Returns ``(B, H_kv, window)``."""
    b, h = x.key.shape[0], x.key.shape[1]
    return torch.arange(x.window, device=x.key.device, dtype=torch.float32).expand(b, h, x.window).contiguous()


PEER_SCORERS = {
    "snapkv": snapkv_scores,
    "expected-attention": expected_attention_scores,
    "knorm": knorm_scores,
    "streamingllm": streamingllm_scores,
}
# Full-precision first tokens each press protects (kvpress's n_sink; 0 where the press has none).
PEER_SINKS = {"snapkv": 0, "expected-attention": EA_SINKS, "knorm": 0, "streamingllm": STREAMING_SINKS}


def register_peers() -> None:
    """Make the peer scorers valid ``scorer=`` names of the cache (idempotent)."""
    for name, fn in PEER_SCORERS.items():
        register_scorer(name, fn)


# ---------------------------------------------------------------------------- plain integer cache
def _quantize_per_token(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of each vector ``(..., D)`` to ``bits`` bits.

    Returns packed codes uint8 ``(..., D * bits / 8)`` and fp16 ``scale``, ``minimum`` ``(...)``.
    """
    levels = (1 << bits) - 1
    xf = x.float()
    lo = xf.amin(dim=-1)
    hi = xf.amax(dim=-1)
    # The scale and minimum are stored in fp16; quantize against the stored values.
    scale = ((hi - lo) / levels).clamp(min=1e-8).to(torch.float16)
    lo16 = lo.to(torch.float16)
    q = torch.round((xf - lo16.float()[..., None]) / scale.float()[..., None]).clamp(0, levels).to(torch.uint8)
    per = 8 // bits
    q = q.reshape(*q.shape[:-1], q.shape[-1] // per, per)
    shifts = torch.arange(per, dtype=torch.uint8, device=x.device) * bits
    packed = (q << shifts).sum(dim=-1, dtype=torch.uint8)
    return packed, scale, lo16


def _dequantize_per_token(
    packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    per = 8 // bits
    mask = (1 << bits) - 1
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
    q = (packed[..., None] >> shifts) & mask
    q = q.reshape(*packed.shape[:-1], packed.shape[-1] * per).float()
    return (q * scale.float()[..., None] + lo.float()[..., None]).to(dtype)


class PerTokenIntLayer(DynamicLayer):
    """Plain per-token integer KV cache: every key and value vector quantized on arrival to ``bits``
    bits over ``head_dim`` (asymmetric min/max, fp16 scale and minimum per vector), no window kept
    in full precision, no eviction. Like transformers' ``QuantizedCache``, the forward that adds a
    token attends to that token unquantized; every later one reads it dequantized.
    """

    is_croppable = False

    def __init__(self, bits: int):
        if bits not in (2, 4, 8):
            raise NexusQuantError(f"per-token integer cache: bits must be 2, 4 or 8, got {bits}")
        super().__init__()
        self.bits = bits
        self.seen = 0
        self._parts: dict[str, list[torch.Tensor]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.dtype = key_states.dtype
            self._parts = {"k": [], "v": []}
        out = []
        for name, new in (("k", key_states), ("v", value_states)):
            parts = self._parts[name]
            if parts:
                packed_old, scale_old, lo_old = parts
                old = _dequantize_per_token(packed_old, scale_old, lo_old, self.bits, new.dtype)
                out.append(torch.cat([old, new], dim=2))
            else:
                out.append(new)
            packed, scale, lo = _quantize_per_token(new, self.bits)
            self._parts[name] = (
                [torch.cat([a, b], dim=2) for a, b in zip(parts, (packed, scale, lo))] if parts else [packed, scale, lo]
            )
        self.seen += key_states.shape[2]
        return out[0], out[1]

    def get_seq_length(self) -> int:
        return self.seen

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for parts in self._parts.values() for t in parts)


class PerTokenIntCache(Cache):
    """A transformers cache of :class:`PerTokenIntLayer`, one per decoder layer."""

    def __init__(self, config: Any, bits: int):
        text = config.get_text_config(decoder=True)
        super().__init__(layers=[PerTokenIntLayer(bits) for _ in range(text.num_hidden_layers)])


# ---------------------------------------------------------------------------- byte accounting
def _tensor_nbytes(x: Any) -> int:
    """Bytes of every plain tensor inside ``x`` (quanto's tensor subclasses are unflattened,
    HQQ's ``(codes, meta)`` tuples and dicts walked)."""
    if isinstance(x, torch.Tensor):
        if type(x) is not torch.Tensor and hasattr(x, "__tensor_flatten__"):
            names, _ = x.__tensor_flatten__()
            return sum(_tensor_nbytes(getattr(x, n)) for n in names)
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_tensor_nbytes(v) for v in x)
    if isinstance(x, dict):
        return sum(_tensor_nbytes(v) for v in x.values())
    return 0


def held_nbytes(cache: Cache) -> int:
    """Every byte a cache holds: nexusquant layers (codes, scales, indices, full-precision parts,
    rotary tables), quantized layers (codes, scales, zero points, the full-precision residual),
    plain layers (their keys and values)."""
    if any(isinstance(l, NexusQuantLayer) for l in cache.layers):
        if not all(isinstance(l, NexusQuantLayer) for l in cache.layers):
            raise NexusQuantError("internal: a cache mixes nexusquant and other layers")
        return int(compression_stats(cache)["nbytes"])
    total = 0
    for layer in cache.layers:
        if isinstance(layer, PerTokenIntLayer):
            total += layer.nbytes()
            continue
        total += _tensor_nbytes(getattr(layer, "_quantized_keys", None))
        total += _tensor_nbytes(getattr(layer, "_quantized_values", None))
        assert isinstance(layer, CacheLayerMixin)  # an attention layer: it has keys and values
        total += _tensor_nbytes(layer.keys) + _tensor_nbytes(layer.values)
    return total


def fp16_reference_nbytes(config: Any, seen: int, batch: int = 1) -> int:
    """Bytes transformers' uncompressed cache would hold for ``seen`` tokens in fp16 (K and V),
    with each sliding-window layer holding only its window, as ``NexusQuantLayer`` counts it."""
    text = config.get_text_config(decoder=True)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    total = 0
    for window in layer_plan(config):
        held = seen if window is None else min(seen, window - 1)
        total += 2 * batch * heads * held * head_dim * 2
    return total
