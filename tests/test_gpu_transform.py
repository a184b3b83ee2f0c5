"""Transform-coded keys (key_codec="pca") on CUDA against the float32 path (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from tiny_models import make_tiny

import nexusquant as nq
from nexusquant.transform import fit_key_transform


def _gpu():
    from nexusquant import gpu

    return gpu


@pytest.mark.gpu
@pytest.mark.parametrize("f", [64, 256, 1024])
@pytest.mark.parametrize("rate", [1.5, 3.5, 8.0])
def test_transform_keys_match_the_float32_decode(f, rate):
    gpu = _gpu()
    torch.manual_seed(f + int(10 * rate))
    t = 700
    x = torch.randn(t, f) @ (torch.randn(f, f) / f**0.5) * torch.linspace(0.2, 3.0, f)
    code = fit_key_transform(x, rate)
    center = torch.randn(f)
    ref = code.decode() + center
    dev = type(code)(*(getattr(code, n).cuda() for n in code._FIELDS))
    got = gpu.transform_keys(dev, center.cuda())
    assert got.dtype == torch.float16
    err = float((got.float().cpu() - ref).norm() / ref.norm())
    # fp16 coefficients and outputs: a few 1e-4; a wrong offset, width or sign is O(1).
    assert err < 2e-3, err
    exact = gpu.transform_keys(dev, center.cuda(), exact=True)
    assert exact.dtype == torch.float32
    # Two fp16 parts per coefficient and a float32 output: float32 accuracy.
    err = float((exact.cpu() - ref).norm() / ref.norm())
    assert err < 1e-5, err
    # Codes that do not end on a byte boundary and 8-bit widths both occur at these rates.
    assert int(code.bits.sum()) % 8 != 0 or rate == 8.0 or f == 64


@pytest.mark.gpu
def test_transform_keys_beyond_fp16_range_stay_float32():
    gpu = _gpu()
    torch.manual_seed(1)
    x = torch.randn(600, 128) * 3e4
    code = fit_key_transform(x, 4.0)
    dev = type(code)(*(getattr(code, n).cuda() for n in code._FIELDS))
    got = gpu.transform_keys(dev, None)
    assert got.dtype == torch.float32
    ref = code.decode()
    assert float((got.cpu() - ref).norm() / ref.norm()) < 1e-4


def _grouped_llama(group: int, head_dim: int):
    """A tiny Llama with ``group`` query heads per KV head (2 KV heads)."""
    config = tf.LlamaConfig(
        vocab_size=96,
        hidden_size=48 * group,  # a multiple of the query heads, as transformers checks
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2 * group,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=2048,
    )
    torch.manual_seed(group)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("q_proj" in name or "k_proj" in name) and p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


CASES = [
    # (model maker, key_domain, chunk_size, whether the fused kernel applies)
    (lambda: make_tiny("llama"), "pre_rope", None, True),  # head_dim 64
    (lambda: make_tiny("llama"), "post_rope", 48, True),
    (lambda: make_tiny("qwen3"), "pre_rope", 48, True),  # head_dim 128
    (lambda: make_tiny("qwen2"), "pre_rope", None, False),  # MHA, head_dim 80: the rebuild path
    (lambda: make_tiny("phi3"), "pre_rope", None, False),  # partial rotary, head_dim 96
    (lambda: make_tiny("gemma3"), "pre_rope", 48, True),  # sliding layers keep E8
    (lambda: _grouped_llama(8, 128), "pre_rope", 48, True),
    (lambda: _grouped_llama(3, 64), "post_rope", None, True),
    (lambda: _grouped_llama(1, 128), "pre_rope", None, True),
    (lambda: _grouped_llama(2, 256), "pre_rope", 48, True),
    (lambda: _grouped_llama(5, 256), "post_rope", None, True),
    (lambda: make_tiny("llama", dtype=torch.bfloat16), "pre_rope", 48, True),
    (lambda: _grouped_llama(4, 128).to(torch.float16), "pre_rope", None, True),
]


def _generate(model, ids, mask, knobs):
    with nq.nexusquant_evict(model, **knobs) as s, torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=40,
            min_new_tokens=40,
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
        layers = [l for l in s.cache.layers if not l.is_sliding]
        assert any(l.tiers["generated"].length > 0 for l in layers), "no generated tier"
        assert all(l.fine.keys.codec is None for l in layers), "not transform-coded"
        lazy = [bool(l.last_view is not None and l.last_view.lazy_tiers) for l in layers]
        formulas = [t.formula is not None for t in s.cache.layers[0].rope_tables.values()]
    return out, lazy, formulas


def _compare(fused, plain, ids, dtype=torch.float32):
    a = torch.stack(fused.scores).float()  # (steps, B, vocab)
    b = torch.stack(plain.scores).float()
    finite = torch.isfinite(b)  # min_new_tokens sets the end-of-sequence score to -inf
    assert torch.equal(finite, torch.isfinite(a))
    scale = float(b[finite].abs().max())
    # fp16 coefficients against float32 (a CPU emulation measured up to 3e-3 of the largest
    # logit); a misplaced or unrotated key moves logits by O(1). A bf16 model's logits are bf16:
    # two steps of its resolution apart is as close as two paths can be (one of 3,800 logits of
    # the bf16 case with 2-bit generated values measured 2^-7 apart at a largest logit of 0.76).
    tol = max(1e-2, 2 * torch.finfo(dtype).eps) * scale
    steps = a.shape[0]
    new_a, new_b = fused.sequences[:, -steps:], plain.sequences[:, -steps:]
    for row in range(ids.shape[0]):
        differ = (new_a[row] != new_b[row]).nonzero()
        same = steps if differ.numel() == 0 else int(differ[0])
        # Up to the first differing token both runs saw the same tokens: their logits must agree.
        upto = min(steps, same + 1)
        got, ref = a[:upto, row], b[:upto, row]
        ok = finite[:upto, row]
        torch.testing.assert_close(got[ok], ref[ok], atol=tol, rtol=0)
        if same < steps:
            # Greedy tokens may differ only where the reference's best two logits nearly tie.
            top = b[same, row].topk(2).values
            assert float(top[0] - top[1]) < 2 * tol, f"row {row}: token {same} differs without a near tie"
    assert (new_a == new_b).float().mean() > 0.5


@pytest.mark.gpu
@pytest.mark.parametrize("table", ["positions", "rows"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_generation_over_transform_coded_keys_matches_the_torch_path(case, table, monkeypatch):
    """Batch 2 with left padding, chunked or one-shot prefill, generation past a block (the
    generated E8 tier exists), rotary tables of positions or of rows: the fused kernel (where it
    applies) gives the rebuild path's attention output at every decode step and layer, and both
    give the torch path's greedy tokens and logits."""
    from nexusquant import attention
    from nexusquant import rope as rope_mod

    gpu = _gpu()
    make, domain, chunk, applies = CASES[case]
    if table == "rows" and domain == "post_rope":
        pytest.skip("post-RoPE keys read no rotary table")
    if table == "rows":
        monkeypatch.setattr(rope_mod, "_formulas", lambda *a, **k: [])
    model = make().cuda()
    torch.manual_seed(case)
    ids = torch.randint(3, 90, (2, 150)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :23] = 0  # left padding of the second row
    ids[1, :23] = 0
    knobs = dict(quality="high", key_codec="pca", key_rate=3.5, key_domain=domain, recent_window=8, block=16)
    if case % 2:
        knobs["generated_value_bits"] = 2  # the generated tier's values at another width than the prompt's
    if chunk is not None:
        knobs["chunk_size"] = chunk
    calls, errors = [], []
    real = gpu.transform_keys
    real_fused = attention._decode_pca_fused

    def counting(code, center, exact=False):
        calls.append(code.codes.shape[0])
        return real(code, center, exact)

    def checking(layer, view, query, key, value, model_mask, scaling):
        out = real_fused(layer, view, query, key, value, model_mask, scaling)
        if out is not None:
            monkeypatch.setattr(gpu, "PCA_FUSED_DISABLED", True)
            ref = attention._decode_rebuilt(layer, view, query, key, value, model_mask, scaling)
            monkeypatch.setattr(gpu, "PCA_FUSED_DISABLED", False)
            assert torch.isfinite(out).all()
            errors.append(float((out.float() - ref.float()).norm() / ref.float().norm()))
        return out

    monkeypatch.setattr(gpu, "transform_keys", counting)
    monkeypatch.setattr(attention, "_decode_pca_fused", checking)
    fused, lazy, formulas = _generate(model, ids, mask, knobs)
    assert all(lazy), "decode did not read the tiers through NexusQuantLayer.decode_tier"
    if domain == "pre_rope":
        assert all(formulas) == (table == "positions") and any(formulas) == (table == "positions")
    if applies:
        assert errors, "the fused kernel did not run"
        # fp16 keys and queries in the score mma against float32 (fp16 GEMM) keys: ~1e-3.
        assert max(errors) < 2e-2, max(errors)
    else:
        assert not errors and calls, "expected the rebuild path"
    monkeypatch.setattr(gpu, "transform_keys_supported", lambda device: False)
    calls.clear()
    plain, lazy, _ = _generate(model, ids, mask, knobs)
    assert not calls and not any(lazy)
    _compare(fused, plain, ids, model.dtype)


def test_fragment_order_and_pair_meta_rebuild_the_keys():
    """CPU: the basis in the kernel's fragment order holds, for every m-tile, k-step and lane, the
    entries the mma's A registers need, and the pair metadata unpacks the codes as the kernel's
    funnel shift does (a model of ``nq_pca_tier`` steps 1-2 against ``KeyTransformCode.decode``)."""
    from nexusquant.gpu.pca_attention import fragment_basis, pair_meta

    torch.manual_seed(0)
    h, p, t = 2, 64, 24
    f = h * p
    x = torch.randn(t, f) @ (torch.randn(f, f) / f**0.5) * torch.linspace(0.2, 3.0, f)
    code = fit_key_transform(x, 3.5)
    k = code.basis.shape[1]
    frag = fragment_basis(code.basis, h)
    meta_i, meta_f, kp = pair_meta(code)
    assert kp % 16 == 0 and kp >= k and k % 16 != 0  # padding exercised
    basis = torch.nn.functional.pad(code.basis.float(), (0, kp - k))
    lane = torch.arange(32)
    gid, tig = lane // 4, lane % 4
    by = frag.view(h, kp // 16, p // 16, 32, 8).long() - 128
    for mt in range(p // 16):
        for ks in range(kp // 16):
            a = torch.zeros(h, 16, 16)
            for j, (dr, dc) in enumerate([(0, 0), (0, 1), (0, 8), (0, 9), (8, 0), (8, 1), (8, 8), (8, 9)]):
                a[:, gid + dr, 2 * tig + dc] = by[:, ks, mt, :, j].float()
            want = basis.view(h, p, kp)[:, mt * 16 : mt * 16 + 16, ks * 16 : ks * 16 + 16]
            assert torch.equal(a, want), (mt, ks)
    raw = code.codes.flatten().long()
    words = torch.nn.functional.pad(raw, (0, 8 - raw.numel() % 4)).view(-1, 4)
    words = (words << torch.tensor([0, 8, 16, 24])).sum(1)
    off, wc = meta_i[:, 0].long(), meta_i[:, 1].long()
    wa, wb = wc & 0xFF, wc >> 8
    bit = torch.arange(t)[:, None] * code.codes.shape[1] * 8 + off[None, :]
    wi = bit >> 5
    v = ((words[wi + 1] << 32 | words[wi]) >> (bit & 31)) & 0xFFFFFFFF
    qa, qb = v & ((1 << wa) - 1), (v >> wa) & ((1 << wb) - 1)
    coef = torch.stack([(qa + meta_f[:, 0]) * meta_f[:, 1], (qb + meta_f[:, 2]) * meta_f[:, 3]], -1).reshape(t, kp)
    keys = code.mean.float() + coef @ basis.T
    ref = code.decode()
    assert float((keys - ref).norm() / ref.norm()) < 1e-6


def test_staged_slots_rebuild_the_keys():
    """CPU: a model of the staged kernel (``NQ_PCA_STAGE``): the coefficients (fp16 ``(T, ld)``, as
    ``nq_pca_coeffs_f16`` writes them) copied into a warp's slots by the 16-byte pieces of
    ``stage()`` (lane + 32 j: token row piece / 8, eight halves at column 8 (piece % 8)), read as
    the mma's B registers and multiplied with the fragment-ordered basis, give
    ``KeyTransformCode.decode`` for a tile that runs past the split's last token."""
    from nexusquant.gpu.pca_attention import _SCS, _SKC, fragment_basis, pair_meta

    torch.manual_seed(1)
    h, p, t = 2, 64, 11  # one tile of 16 rows over 11 tokens: rows 11..15 repeat token 10
    f = h * p
    x = torch.randn(t, f) @ (torch.randn(f, f) / f**0.5) * torch.linspace(0.2, 3.0, f)
    code = fit_key_transform(x, 3.5)
    k = code.basis.shape[1]
    meta_i, meta_f, kp = pair_meta(code)
    ld = -(-k // _SKC) * _SKC
    ref = code.decode() - code.mean.float()
    # Coefficients as the pre-pass gives them: decode's (codes dequantized) in fp16, zeros past K.
    basis = code.basis.float()
    coef = torch.linalg.lstsq(basis, ref.T).solution.T  # (t, k): exact, basis has full column rank
    coeffs = torch.zeros(t, ld)
    coeffs[:, :k] = coef
    by = fragment_basis(code.basis, h).view(h, kp // 16, p // 16, 32, 8).float() - 128
    lane = torch.arange(32)
    gid, tig = lane // 4, lane % 4
    keys = torch.zeros(h, p, 16)  # K^T of the tile: dims x token rows
    n, last = t, t - 1
    for ci in range(-(-kp // _SKC)):
        slot = torch.full((16, _SCS), float("nan"))
        for j in range(4):
            piece = lane + 32 * j
            r, cc = piece >> 3, piece & 7
            for L in range(32):
                tt = min(int(r[L]), n - 1)
                slot[r[L], cc[L] * 8 : cc[L] * 8 + 8] = coeffs[tt, ci * _SKC + cc[L] * 8 : ci * _SKC + cc[L] * 8 + 8]
        kc = min(_SKC, kp - ci * _SKC)
        for ks in range(kc // 16):
            bmat = torch.zeros(16, 16)  # B: components x token rows (both n-tiles)
            for half in range(2):
                rows = gid + 8 * half
                for dc in (0, 1, 8, 9):
                    bmat[2 * tig + dc, rows] = slot[rows, ks * 16 + 2 * tig + dc]
            for mt in range(p // 16):
                a = torch.zeros(h, 16, 16)
                for jj, (dr, dc) in enumerate([(0, 0), (0, 1), (0, 8), (0, 9), (8, 0), (8, 1), (8, 8), (8, 9)]):
                    a[:, gid + dr, 2 * tig + dc] = by[:, ci * _SKC // 16 + ks, mt, :, jj]
                keys[:, mt * 16 : mt * 16 + 16] += a @ bmat
    got = keys.permute(2, 0, 1).reshape(16, f)
    want = torch.cat([ref, ref[last:].expand(16 - t, f)])
    assert float((got - want).norm() / want.norm()) < 1e-4
