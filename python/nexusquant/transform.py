"""A transform coder for keys: the prompt's own principal components, bits by reverse water-filling.

Keys of one layer live in a small subspace (DESIGN.md, "Where the bits should go"): a per-vector
Hadamard + E8 code spreads its bits over every dimension, most of which carry almost nothing. This
coder, per layer and batch row, computed at compression time from the prompt's own keys (nothing
trained, no calibration data):

1. puts the keys of all KV heads side by side, ``(T, F)`` with ``F = kv_heads * head_dim``, and
   subtracts their mean;
2. takes the principal components of those keys (an ``F x F`` eigendecomposition);
3. gives each component an integer number of bits (0–8) by greedy reverse water-filling on its
   variance, for a budget of bits per element: a component whose variance lies under the water
   level costs nothing and is not stored;
4. quantizes each kept coefficient with a uniform fixed-rate quantizer, its step chosen on the data
   (the mean squared error of a few candidate steps around the Gaussian optimum is measured), and
   packs the integers into a fixed number of bytes per token, so a token's codes are random access.

The basis (fp16, only the kept components), the mean (fp16), the steps (fp32) and the per-component
widths are held beside the codes and counted in the cache's bytes: at short prompts they are a real
part of the cost.

Attention can score against the coefficients directly, ``q·k = (Bᵀq)·c + q·mean``, with one small
transform of the query per step; the CPU path here dequantizes one layer at a time.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

__all__ = [
    "KeyTransformCode",
    "fit_key_transform",
    "allocate_bits",
    "code_bytes",
    "pack_fixed",
    "unpack_fixed",
    "GAUSSIAN_STEP",
    "GAUSSIAN_MSE",
    "MAX_BITS",
    "MIN_AMORTIZED_TOKENS",
]

MAX_BITS = 8
MIN_AMORTIZED_TOKENS = 512
# Optimal step (in units of the standard deviation) and its mean squared error (in units of the
# variance) of a uniform quantizer with 2^b levels on a unit Gaussian, b = 1..8 (Max 1960; Jayant
# and Noll, table 4.3). b = 0 spends nothing: the error is the whole variance.
GAUSSIAN_STEP = (0.0, 1.596, 0.9957, 0.5860, 0.3352, 0.1881, 0.1041, 0.0569, 0.0308)
GAUSSIAN_MSE = (1.0, 0.3634, 0.1188, 0.03744, 0.01154, 0.003490, 0.001040, 0.0003030, 0.0000870)
# Multiples of the Gaussian step tried on the data: keys are not Gaussian (heavy tails, a few
# outlier tokens), and the best clipping range for the prompt at hand is cheap to measure.
_STEP_SWEEP = (0.6, 0.7, 0.8, 0.9, 1.0, 1.15, 1.3, 1.5, 1.75, 2.0)
# Tokens per block where the coder works token by token. Float32 copies of a whole long prompt's
# keys (centred, weighted, coefficients, integers) made most of the peak of re-coding a prompt at
# the end of a chunked prefill (benches/gpu_bench.py --phase fair, 128K tokens: 4 GB of one
# layer's 6.4 GB working set); blocks keep one full-length copy, the coefficients.
_ROW_BLOCK = 16384


def _row_blocks(t: int) -> list[slice]:
    """Slices of ``t`` rows, ``_ROW_BLOCK`` at a time (one slice for a short prompt)."""
    return [slice(a, min(a + _ROW_BLOCK, t)) for a in range(0, t, _ROW_BLOCK)] or [slice(0, 0)]


def _bit_gains(weight: torch.Tensor, max_bits: int) -> torch.Tensor:
    """float64 ``(F, max_bits)``: the error the b-th bit of each component removes (its weight times
    the Gaussian uniform quantizer's MSE drop), decreasing in b."""
    mse = torch.tensor(GAUSSIAN_MSE[: max_bits + 1], dtype=torch.float64)
    return weight.double().clamp(min=0)[:, None] * (mse[:-1] - mse[1:])[None, :]


def allocate_bits(variances: torch.Tensor, total_bits: int, max_bits: int = MAX_BITS) -> torch.Tensor:
    """Integer bits per component for ``total_bits`` in all, by greedy reverse water-filling.

    The gain of the b-th bit of component i is ``variances[i] * (MSE(b-1) - MSE(b))`` with the
    Gaussian uniform quantizer's MSE; the gains of one component shrink with b, so the greedy choice
    (spend each bit where it removes the most squared error) is the ``total_bits`` largest gains.

    Parameters
    ----------
    variances : torch.Tensor
        float ``(F,)``, non-negative.
    total_bits : int
        Bits to spend per token, ``0 <= total_bits <= F * max_bits``.

    Returns
    -------
    torch.Tensor
        int64 ``(F,)``, each in ``[0, max_bits]``, summing to ``total_bits``.
    """
    f = variances.shape[0]
    total_bits = max(0, min(int(total_bits), f * max_bits))
    gains = _bit_gains(variances, max_bits)
    bits = torch.zeros(f, dtype=torch.int64)
    if total_bits == 0:
        return bits
    top = torch.topk(gains.reshape(-1), total_bits).indices
    bits.scatter_add_(0, top // max_bits, torch.ones_like(top))
    return bits


def _quantize(c: torch.Tensor, step: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Midrise uniform quantizer: integers in ``[0, levels)`` for coefficients ``c`` ``(..., K)``."""
    half = (levels // 2).to(c.dtype)
    q = torch.floor(c / step) + half
    return torch.minimum(torch.clamp(q, min=0), (levels - 1).to(c.dtype))


def _reconstruct(q: torch.Tensor, step: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    half = (levels // 2).to(step.dtype)
    return (q.to(step.dtype) - half + 0.5) * step


def _best_steps(c: torch.Tensor, bits: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """Per component, the step of the sweep with the smallest squared error on ``c`` ``(T, K)``."""
    blocks = _row_blocks(c.shape[0])
    total = float(c.shape[0]) if weights is None else weights.sum().clamp(min=1)

    def weighted_sum(e: torch.Tensor, rows: slice) -> torch.Tensor:
        return e.sum(0) if weights is None else (e * weights[rows, None]).sum(0)

    square = torch.zeros(c.shape[1], dtype=c.dtype, device=c.device)
    for rows in blocks:
        square += weighted_sum(c[rows].pow(2), rows)
    sd = (square / total).sqrt().clamp(min=1e-12)
    base = sd * torch.tensor(GAUSSIAN_STEP, dtype=c.dtype, device=c.device)[bits.long()]
    levels = (2**bits).to(torch.int64)
    sweep = torch.tensor(_STEP_SWEEP, dtype=c.dtype, device=c.device)
    cand = base[None, :] * sweep[:, None]  # (S, K)
    err = []
    for s in range(cand.shape[0]):
        e = torch.zeros_like(square)
        for rows in blocks:
            r = _reconstruct(_quantize(c[rows], cand[s], levels), cand[s], levels) - c[rows]
            e += weighted_sum(r.pow(2), rows)
        err.append(e)
    best = torch.stack(err).argmin(0)  # (K,)
    return cand.gather(0, best[None, :])[0]


def _choose_components(
    weight: torch.Tensor,
    bits_per_token: float,
    side_bits_per_component: float,
    side_bits_fixed: float,
    max_bits: int = MAX_BITS,
) -> torch.Tensor:
    """Bits per component (sorted by ``weight``, descending) for a budget that also pays for the
    basis: keeping K components costs ``K * side_bits_per_component + side_bits_fixed`` bits per
    token before any code bit. Tries every K (``allocate_bits`` on the first K components, with the
    bits left after their side information) and keeps the allocation of least (Gaussian model)
    error; a K that would keep a component without bits is skipped (a smaller K does the same for
    less).

    The Ks are tried in one sweep: the greedy allocation of the first K components is the
    ``budget(K)`` largest of their bit gains, so the sweep keeps those chosen gains in a heap and
    the others in a second one, adds component K's gains and moves gains between the two until
    the chosen are the budget's largest. (``allocate_bits`` for every K, a sort of up to
    ``F * max_bits`` gains each, took 0.3 s per layer at F = 1024 on the chunked prefill's path,
    benches/chunked_prefill_profile.py.)"""
    f = weight.shape[0]
    w = weight.double().clamp(min=0)
    gains = _bit_gains(w, max_bits).tolist()
    # A gain is (value, index = component * max_bits + bit); the better of two equal values is the
    # lower index (a lower component, then a lower bit). `chosen` is a min-heap of (value, -index),
    # the worst chosen on top; `others` a max-heap of (-value, index), the best of the rest on top.
    chosen: list[tuple[float, int]] = []
    others: list[tuple[float, int]] = []
    chosen_gain, chosen_first_bits = 0.0, 0
    no_bits_error = GAUSSIAN_MSE[0] * float(w.sum())
    best_k, best_budget, best_err = 0, 0, no_bits_error

    def choose_best_other() -> None:
        nonlocal chosen_gain, chosen_first_bits
        neg_value, index = heapq.heappop(others)
        heapq.heappush(chosen, (-neg_value, -index))
        chosen_gain -= neg_value
        chosen_first_bits += index % max_bits == 0

    def drop_worst_chosen() -> None:
        nonlocal chosen_gain, chosen_first_bits
        value, neg_index = heapq.heappop(chosen)
        heapq.heappush(others, (-value, -neg_index))
        chosen_gain -= value
        chosen_first_bits -= -neg_index % max_bits == 0

    for k in range(1, f + 1):
        code_bits = int(bits_per_token - k * side_bits_per_component - side_bits_fixed)
        if code_bits < k:
            break  # code_bits - k only falls as k grows
        budget = min(code_bits, k * max_bits)
        for b, value in enumerate(gains[k - 1]):
            heapq.heappush(others, (-value, (k - 1) * max_bits + b))
        while len(chosen) < budget and others:
            choose_best_other()
        while len(chosen) > budget:
            drop_worst_chosen()
        # A new gain better than the worst chosen one takes its place.
        while chosen and others and (-others[0][0], -others[0][1]) > chosen[0]:
            choose_best_other()
            drop_worst_chosen()
        # Gains fall with b, so a component has bits exactly when its first bit is chosen.
        err = no_bits_error - chosen_gain
        if chosen_first_bits == k and err < best_err:
            best_k, best_budget, best_err = k, budget, err
    bits = torch.zeros(f, dtype=torch.int64)
    if best_k:
        bits[:best_k] = allocate_bits(w[:best_k], best_budget, max_bits)
    return bits


def _choose_components_lagrangian(
    weight: torch.Tensor,
    lagrange: float,
    side_bits_per_component: float,
    max_bits: int = MAX_BITS,
) -> torch.Tensor:
    """Bits per component for the least ``error + lagrange * bits`` (the budget is not fixed: a
    bit is spent where it removes more than ``lagrange`` of weighted error, and a component is kept
    only if its bits remove more than they cost, its basis column included). With the same
    ``lagrange`` everywhere, every bit anywhere buys the same error: a common water level."""
    gains = _bit_gains(weight, max_bits)
    bits = (gains > lagrange).sum(1)  # the drops decrease, so the useful bits are a prefix
    net = (gains - lagrange).clamp(min=0).sum(1) - lagrange * side_bits_per_component
    return torch.where((bits > 0) & (net > 0), bits, torch.zeros_like(bits))


@dataclass
class KeyTransformCode:
    """Keys of one layer as transform coefficients, per batch row (shapes for one row).

    Attributes
    ----------
    mean : torch.Tensor
        fp16 ``(F,)``, the keys' mean (F = kv_heads * head_dim).
    basis : torch.Tensor
        int8 ``(F, K)``: the K kept synthesis vectors (those given at least one bit), each column
        scaled by ``basis_scale`` (8 bits per entry add about -43 dB of error to a coefficient,
        far under the coefficients' own quantization error).
    basis_scale : torch.Tensor
        fp16 ``(K,)``.
    step : torch.Tensor
        float32 ``(K,)``: each component's quantizer step.
    bits : torch.Tensor
        uint8 ``(K,)``: each component's bits (1–8).
    codes : torch.Tensor
        uint8 ``(T, code_bytes)``: each token's integers, packed LSB-first at fixed offsets.
    """

    mean: torch.Tensor
    basis: torch.Tensor
    basis_scale: torch.Tensor
    step: torch.Tensor
    bits: torch.Tensor
    codes: torch.Tensor
    # The LU factors of the basis's Gram matrix, for the least-squares coefficients of every later
    # block of keys (a chunked prefill codes each chunk in the first chunk's basis: factoring the
    # Gram matrix again for every chunk was 21% of the GPU's time in a 64K-token prefill,
    # benches/chunked_prefill_profile.py --torch-profile). Made by the first encode_more, held by
    # the row's first code only, counted in nbytes while held, let go when the prompt is coded
    # (TransformCodedKeys.release_analysis); never saved.
    analysis: Optional[tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False, compare=False)

    _FIELDS = ("mean", "basis", "basis_scale", "step", "bits", "codes")

    @property
    def length(self) -> int:
        return self.codes.shape[0]

    def nbytes(self) -> int:
        held = [getattr(self, n) for n in self._FIELDS] + list(self.analysis or ())
        return sum(t.numel() * t.element_size() for t in held)

    def synthesis(self) -> torch.Tensor:
        """float32 ``(F, K)``: key = mean + synthesis @ coefficients."""
        return self.basis.float() * self.basis_scale.float()[None, :]

    def coefficients(self, rows: slice = slice(None)) -> torch.Tensor:
        """The quantized coefficients of the tokens ``rows``, float32 ``(T, K)``."""
        q = unpack_fixed(self.codes[rows], self.bits)
        return _reconstruct(q, self.step.float(), 2 ** self.bits.to(torch.int64))

    def decode(self) -> torch.Tensor:
        """Keys, float32 ``(T, F)``."""
        synth_t = self.synthesis().T
        out = torch.empty(self.length, synth_t.shape[1], dtype=torch.float32, device=self.codes.device)
        for rows in _row_blocks(self.length):  # the integers of a whole prompt are 8 bytes each
            out[rows] = self.mean.float() + self.coefficients(rows) @ synth_t
        return out

    def encode_more(self, x: torch.Tensor) -> KeyTransformCode:
        """Codes of more keys ``x`` ``(T, F)`` with this basis, steps and widths (a generated block):
        least-squares coefficients on the held basis (the prompt's metric is not kept)."""
        synth = self.synthesis()
        if self.analysis is None and synth.shape[1]:
            self.analysis = _gram_lu(synth)
        c = _coefficients(x, self.mean, synth, self.analysis)
        row_bytes = self.codes.shape[1]  # the widths are this code's: so is the row length
        return replace(self, codes=_pack_coefficients(c, self.step.float(), self.bits, row_bytes), analysis=None)


def _gram_lu(synth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LU factors and pivots of ``synthᵀ synth`` (``synth`` ``(F, K)``): what ``torch.linalg.solve``
    factors on every call, so solving with them gives its results to the bit."""
    lu, pivots, _ = torch.linalg.lu_factor_ex(synth.T @ synth)
    return lu, pivots


def _coefficients(
    x: torch.Tensor,
    mean: torch.Tensor,
    synth: torch.Tensor,
    analysis: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Least-squares coefficients ``(T, K)`` of keys ``x`` ``(T, F)`` less ``mean`` on the columns
    of ``synth`` ``(F, K)``, a block of tokens at a time; ``analysis``: ``_gram_lu(synth)`` where
    already made."""
    c = torch.empty(x.shape[0], synth.shape[1], dtype=torch.float32, device=x.device)
    if synth.shape[1] == 0:
        return c
    if analysis is None:
        analysis = _gram_lu(synth)
    for rows in _row_blocks(x.shape[0]):
        c[rows] = _analyse(x[rows].float() - mean.float(), synth, analysis)
    return c


def _pack_coefficients(c: torch.Tensor, step: torch.Tensor, bits: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """Coefficients ``c`` ``(T, K)`` quantized with ``step`` and packed at widths ``bits`` (uint8
    ``(K,)``, ``row_bytes`` = :func:`code_bytes` of them, known to the caller without reading the
    widths back from the GPU): uint8 ``(T, row_bytes)``, a block of tokens at a time."""
    levels = 2 ** bits.to(torch.int64)
    blocks = [
        pack_fixed(_quantize(c[rows], step, levels).to(torch.int64), bits, row_bytes)
        for rows in _row_blocks(c.shape[0])
    ]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, 0)


def _analyse(xc: torch.Tensor, synth: torch.Tensor, analysis: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Least-squares coefficients of centred keys ``xc`` ``(T, F)`` on the columns of ``synth``
    ``(F, K)``, with ``analysis = _gram_lu(synth)`` (a full-rank basis: its Gram matrix is positive
    definite, so the factors are used without the error check that waits for the GPU)."""
    lu, pivots = analysis
    return torch.linalg.lu_solve(lu, pivots, synth.T @ xc.T).T


def _int8_columns(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per column: ``m ≈ q * scale``; returns (int8 ``(F, K)``, fp16 ``(K,)``)."""
    scale = (m.abs().amax(0) / 127.0).clamp(min=1e-8).to(torch.float16)
    q = torch.round(m / scale.float()[None, :]).clamp(-127, 127).to(torch.int8)
    return q, scale


def fit_key_transform(
    x: torch.Tensor,
    bits_per_element: float,
    valid: Optional[torch.Tensor] = None,
    query_moment: Optional[torch.Tensor] = None,
    lagrange: Optional[float] = None,
    amortize_tokens: int = 0,
) -> KeyTransformCode:
    """Fit the transform coder to keys ``x`` ``(T, F)`` and encode them.

    Parameters
    ----------
    x : torch.Tensor
        Keys ``(T, F)`` (any float dtype), the KV heads side by side.
    bits_per_element : float
        Budget in bits per key element of these ``T`` tokens, everything included: codes, basis,
        mean, steps. Keeping a component costs its basis column (``8 F + 16`` bits plus its step and
        width) spread over the ``T`` tokens (at least ``MIN_AMORTIZED_TOKENS``), so short prompts
        keep fewer components; below that many tokens the budget is exceeded.
    valid : torch.Tensor, optional
        bool ``(T,)``: tokens to fit on (padding excluded); all tokens are encoded.
    query_moment : torch.Tensor, optional
        float ``(F, F)``: the second moment of the queries that read these keys (block diagonal
        over KV heads). A key error ``e`` changes a logit by ``q·e``, so the error that matters is
        ``eᵀ M e``: the components are the principal components of the keys in that metric (keys
        multiplied by ``M^½``, then mapped back), so bits go where the queries look. Without it,
        the plain principal components.
    lagrange : float, optional
        Spend bits for the least ``error + lagrange * bits`` instead of for ``bits_per_element``
        (``_choose_components_lagrangian``; a study knob, benches/key_transform_study.py).
    amortize_tokens : int
        Spread the basis's bytes over at least this many tokens: a chunked prefill fits the basis
        on its first chunk and codes the rest of the prompt in it (``nexusquant.chunking``).

    Returns
    -------
    KeyTransformCode
    """
    t, f = x.shape
    blocks = _row_blocks(t)
    w = None if valid is None else valid.to(torch.float32)
    n = float(t) if w is None else float(w.sum().clamp(min=1).item())

    def weighted(rows: slice, xr: torch.Tensor) -> torch.Tensor:
        return xr if w is None else xr * w[rows, None]

    mean = torch.zeros(f, dtype=torch.float32, device=x.device)
    for rows in blocks:
        mean += weighted(rows, x[rows].float()).sum(0)
    mean /= n
    mean16 = mean.to(torch.float16)
    cov = torch.zeros(f, f, dtype=torch.float64, device=x.device)
    for rows in blocks:
        xc = x[rows].float() - mean16.float()
        cov += (weighted(rows, xc).T @ xc).double()
    cov /= n
    if query_moment is not None:
        m = query_moment.double()
        # A small ridge keeps directions no query looked at from being scaled to infinity.
        m = m + 1e-3 * float(m.diagonal().mean().clamp(min=1e-12)) * torch.eye(f, dtype=torch.float64, device=m.device)
        ev, evec = torch.linalg.eigh(m)
        root = evec @ torch.diag(ev.sqrt()) @ evec.T
        inv_root = evec @ torch.diag(ev.rsqrt()) @ evec.T
        var, vec = torch.linalg.eigh(root @ cov @ root)
        var, vec = var.flip(0).clamp(min=0), vec.flip(1)
        synth_all = inv_root @ vec
    else:
        var, vec = torch.linalg.eigh(cov)  # ascending
        var, vec = var.flip(0).clamp(min=0), vec.flip(1)
        synth_all = vec
    # Side information per kept component: an int8 column, its fp16 scale, fp32 step, uint8 width,
    # spread over the prompt's tokens, but over no fewer than MIN_AMORTIZED_TOKENS: generated
    # tokens reuse the basis too, and a short prompt that kept only a handful of components would
    # code everything generated after it badly.
    spread = max(n, MIN_AMORTIZED_TOKENS, amortize_tokens)
    per_component = (8 * f + 16 + 32 + 8) / spread
    fixed = 16 * f / spread
    # The allocation works on F numbers: on the CPU, whatever device the keys are on.
    if lagrange is None:
        bits_on_host = _choose_components(var.cpu(), bits_per_element * f, per_component, fixed)
    else:
        bits_on_host = _choose_components_lagrangian(var.cpu(), lagrange, per_component)
    bits = bits_on_host.to(x.device)
    keep = bits > 0
    basis, basis_scale = _int8_columns(synth_all[:, keep].float())
    kbits = bits[keep]
    synth = basis.float() * basis_scale.float()[None, :]
    # Coefficients on the basis the decoder will hold (int8), so encoder and decoder agree.
    c = _coefficients(x, mean16, synth)
    step = _best_steps(c, kbits, w).to(torch.float32)
    codes = _pack_coefficients(c, step, kbits.to(torch.uint8), code_bytes(bits_on_host))
    return KeyTransformCode(mean16, basis, basis_scale, step, kbits.to(torch.uint8), codes)


def code_bytes(bits: torch.Tensor) -> int:
    """Bytes per token of codes packed at widths ``bits`` ``(K,)``: ceil(sum / 8). Read from a
    GPU tensor, the sum waits for the GPU: pass widths held on the host where there are some."""
    return (int(bits.to(torch.int64).sum()) + 7) // 8


def _layout(bits: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Byte index, bit shift and mask of each component's code."""
    widths = bits.to(device=device, dtype=torch.int64)
    offsets = torch.cumsum(widths, 0) - widths
    return offsets // 8, offsets % 8, (1 << widths) - 1


def pack_fixed(q: torch.Tensor, bits: torch.Tensor, row_bytes: Optional[int] = None) -> torch.Tensor:
    """Pack integers ``q`` ``(T, K)`` of widths ``bits`` ``(K,)`` (1–8 each) into uint8
    ``(T, ceil(sum / 8))``, LSB-first at fixed offsets: component i starts at bit
    ``sum(bits[:i])`` of every token's bytes. ``row_bytes``: that row length where the caller
    knows it (:func:`code_bytes` of widths held on a GPU waits for the GPU)."""
    t, k = q.shape
    byte, shift, mask = _layout(bits, q.device)
    nbytes = code_bytes(bits) if row_bytes is None else row_bytes
    out = torch.zeros(t, nbytes + 1, dtype=torch.int32, device=q.device)  # one spare byte for spill-over
    if k == 0 or t == 0:
        return out[:, :nbytes].to(torch.uint8)
    v = (q.to(torch.int32) & mask.to(torch.int32)) << shift.to(torch.int32)  # at most 15 bits: two bytes
    # Codes never share a bit, so adding their bytes is the same as OR-ing them.
    out.scatter_add_(1, byte.expand(t, k), v & 0xFF)
    out.scatter_add_(1, (byte + 1).expand(t, k), v >> 8)
    return out[:, :nbytes].to(torch.uint8)


def unpack_fixed(codes: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fixed`: int64 ``(T, K)``."""
    t = codes.shape[0]
    byte, shift, mask = _layout(bits, codes.device)
    if byte.numel() == 0:
        return torch.zeros(t, 0, dtype=torch.int64, device=codes.device)
    c = torch.cat([codes, torch.zeros(t, 1, dtype=codes.dtype, device=codes.device)], 1).to(torch.int32)
    lo = c[:, byte]
    hi = c[:, byte + 1]
    return (((lo | (hi << 8)) >> shift.to(torch.int32)) & mask.to(torch.int32)).to(torch.int64)
