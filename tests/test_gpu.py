"""The CUDA path against the CPU reference (skipped without a CUDA device and CuPy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import make_tiny

import nexusquant as nq
from nexusquant.codec import as_codec_input

pytestmark = pytest.mark.gpu

DIMS = [64, 80, 96, 128, 256]


def _gpu():
    from nexusquant import gpu

    return gpu


@pytest.mark.parametrize("head_dim", DIMS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_equals_rust_codes(head_dim, bits, dtype):
    gpu = _gpu()
    codec = nq.E8Codec(head_dim, bits, seed=3)
    x = (torch.randn(3000, head_dim) * torch.rand(3000, 1) * 4).to(dtype)
    codes, scales = gpu.encode(codec, x.cuda())
    ref_codes, ref_scales = codec.encode_arrays(*as_codec_input(x))
    got_c, got_s = codes.cpu().numpy(), scales.cpu().numpy().view(np.uint16)
    # Same float operations in the same order: no code may differ.
    assert (got_s != ref_scales).sum() == 0
    assert (got_c != ref_codes).any(axis=1).sum() == 0
    out = gpu.decode(codec, codes, scales, dtype).cpu()
    name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    ref_out = codec.decode_arrays(ref_codes, ref_scales, name)
    ref_t = torch.from_numpy(ref_out)
    if name != "float32":
        ref_t = ref_t.view(torch.int16).view(dtype)
    assert torch.equal(out, ref_t)


def test_bad_input_raises_on_gpu():
    gpu = _gpu()
    codec = nq.E8Codec(128, 2)
    x = torch.randn(10, 128, device="cuda")
    x[7, 3] = float("nan")
    with pytest.raises(nq.NexusQuantError, match="vector 7"):
        gpu.encode(codec, x)


def test_misaligned_input_takes_the_generic_kernel():
    """A view that does not start on a 16-byte boundary cannot use the vector loads of the fast
    kernels: the generic kernel must take it, with the same codes."""
    gpu = _gpu()
    codec = nq.E8Codec(128, 2, seed=1)
    buf = torch.randn(401 * 128 + 1, device="cuda", dtype=torch.float16)
    x = buf[1:].view(401, 128)
    assert x.data_ptr() % 16 != 0
    codes, scales = gpu.encode(codec, x)
    ref_codes, ref_scales = codec.encode_arrays(*as_codec_input(x.cpu()))
    assert (codes.cpu().numpy() != ref_codes).sum() == 0
    assert (scales.cpu().numpy().view(np.uint16) != ref_scales).sum() == 0


def _attention_case(b, hkv, group, head_dim, tier_bits, tier_tokens, dtype, n_sink, window, masked, seed):
    gpu = _gpu()
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    hq = hkv * group
    tfp = n_sink + window
    query = randn(b, hq, 1, head_dim).to(dtype)
    key = (randn(b, hkv, tfp, head_dim) * 2).to(dtype)
    value = randn(b, hkv, tfp, head_dim).to(dtype)
    w_total = window + 5
    win_valid = torch.rand(b, w_total, device="cuda", generator=gen) > 0.2
    win_valid[:, -1] = True  # the new token sees itself
    fp_mask = None
    allowed = torch.ones(b, hkv, tfp, dtype=torch.bool, device="cuda")
    allowed[:, :, n_sink:] = win_valid[:, None, w_total - window :]
    if masked:
        fp_mask = torch.rand(b, hkv, tfp, device="cuda", generator=gen) > 0.3
        fp_mask[:, :, -1] = True
        allowed = fp_mask
    tiers = []
    for (kb, vb), t in zip(tier_bits, tier_tokens):
        kc, vc = nq.E8Codec(head_dim, kb, 7), nq.E8Codec(head_dim, vb, 7)
        kcodes, kscales = gpu.encode(kc, randn(b, hkv, t, head_dim) * 2)
        vcodes, vscales = gpu.encode(vc, randn(b, hkv, t, head_dim))
        valid = (torch.rand(b, hkv, t, device="cuda", generator=gen) > 0.1) if masked else None
        tiers.append(gpu.CodedTier(kcodes, kscales, vcodes, vscales, valid, kc, vc))
    k_center = randn(b, hkv, 1, head_dim).to(dtype)
    v_center = randn(b, hkv, 1, head_dim).to(dtype)
    scaling = head_dim**-0.5
    out = torch.full((b, 1, hq, head_dim), float("nan"), dtype=dtype, device="cuda")  # poisoned
    got = gpu.decode_attention(
        query, key, value, n_sink, fp_mask, win_valid, tiers, k_center, v_center, scaling, out=out
    )
    want = gpu.decode_attention_reference(query, key, value, allowed, tiers, k_center, v_center, scaling)
    args = (query, key, value, n_sink, fp_mask, win_valid, tiers, k_center, v_center, scaling)
    return got, want, args


# fp16 operands on the tensor cores (the rotated query and the probabilities; the 1- and 2-bit
# codewords are exact in fp16), fp32 accumulation: relative error near 1e-3 at most; a bf16 output
# adds its own rounding (2^-9).
_TOL = {torch.float16: 2e-3, torch.float32: 2e-3, torch.bfloat16: 6e-3}


@pytest.mark.parametrize(
    "head_dim,group,tier_bits,dtype",
    [
        (128, 4, ((2, 2), (1, 1)), torch.float16),  # Llama-3-8B, the balanced preset's two tiers
        (128, 4, ((2, 2),), torch.bfloat16),
        (128, 1, ((3, 2), (1, 1)), torch.bfloat16),
        (64, 8, ((4, 4), (2, 3)), torch.float32),
        (64, 3, ((1, 1),), torch.float16),
        (256, 2, ((2, 2), (1, 1)), torch.float16),
    ],
)
@pytest.mark.parametrize("tokens", [(5, 3), (1500, 700), (20011, 4099)])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_matches_reference(head_dim, group, tier_bits, dtype, tokens, masked):
    got, want, _ = _attention_case(3, 2, group, head_dim, tier_bits, tokens, dtype, 4, 37, masked, seed=sum(tokens))
    assert not torch.isnan(got).any()  # every output element was written
    rel = ((got.double() - want).norm() / want.norm()).item()
    assert rel < _TOL[dtype]


def test_decode_attention_relaunch_is_deterministic():
    """The completion counters reset themselves: launches of other shapes in between change nothing."""
    gpu = _gpu()
    got, _, args = _attention_case(2, 8, 4, 128, ((2, 2), (1, 1)), (9000, 3000), torch.float16, 4, 33, False, seed=5)
    _attention_case(5, 2, 4, 128, ((2, 2),), (700,), torch.float16, 4, 20, True, seed=6)
    again = gpu.decode_attention(*args)
    assert torch.equal(got, again)


def test_decode_attention_long_window():
    """More full-precision tokens than one 128-token chunk of the kernel's full-precision block."""
    got, want, _ = _attention_case(2, 2, 4, 128, ((2, 2),), (3000,), torch.float16, 4, 300, True, seed=9)
    rel = ((got.double() - want).norm() / want.norm()).item()
    assert rel < _TOL[torch.float16]


def _generate_on_cpu_and_cuda(model, knobs):
    """Greedy scores of 20 new tokens after a random 150-token prompt (batch 2) on the CPU, then with
    the model moved to CUDA; returns (cpu scores, cuda scores on the CPU, the CUDA session's cache)."""
    ids = torch.randint(3, 90, (2, 150))
    gen = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with nq.nexusquant_evict(model, **knobs), torch.no_grad():
        cpu = model.generate(ids, **gen)
    model = model.cuda()
    with nq.nexusquant_evict(model, **knobs) as s, torch.no_grad():
        gpu_out = model.generate(ids.cuda(), **gen)
    return torch.stack(cpu.scores), torch.stack(gpu_out.scores).cpu(), s.cache


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generation_on_cuda_matches_cpu(family):
    knobs = dict(quality=nq.E8_PRESETS["balanced"], recent_window=8, block=16, demote=0.2)  # both E8 tiers
    a, b, cache = _generate_on_cpu_and_cuda(make_tiny(family), knobs)
    layer = cache.layers[0]
    assert layer.fine.keys.codes.is_cuda
    assert layer.last_view.lazy_tiers  # decode read the codes through the kernel
    torch.testing.assert_close(b, a, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("preset", ["high", "max"])
def test_preset_generation_on_cuda_matches_cpu(preset):
    """The presets (transform-coded keys, E8 values) generate on CUDA what they generate on the CPU."""
    a, b, cache = _generate_on_cpu_and_cuda(make_tiny("llama"), dict(quality=preset, recent_window=8, block=16))
    assert cache.layers[0].fine.keys.rows[0][0].codes.is_cuda
    torch.testing.assert_close(b, a, atol=5e-3, rtol=5e-3)


def test_kernels_run_on_the_tensors_device():
    """Layers split over devices (device_map): each layer's codes stay on and run on its GPU."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    gpu = _gpu()
    codec = nq.E8Codec(128, 2)
    for i in range(torch.cuda.device_count()):
        x = torch.randn(100, 128, device=f"cuda:{i}")
        c, s = gpu.encode(codec, x)
        assert c.device == x.device
        y = gpu.decode(codec, c, s, torch.float32)
        assert y.device == x.device


def _split_over_two_gpus(model):
    """accelerate's dispatch_model as ``from_pretrained(device_map=...)`` calls it: the embedding
    and the first half of the layers on cuda:0, the rest with the norm and the head on cuda:1."""
    from accelerate import dispatch_model

    n = model.config.num_hidden_layers
    dm = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
    dm.update({f"model.layers.{i}": i * 2 // n for i in range(n)})
    dispatch_model(model, device_map=dm, skip_keys=model._skip_keys_device_placement)
    return model


@pytest.mark.parametrize("family,key_domain", [("llama", "post_rope"), ("llama", "pre_rope"), ("qwen3", "post_rope")])
def test_device_map_split_matches_one_gpu(family, key_domain):
    """A model split over cuda:0 and cuda:1 with device_map generates what it does on one GPU; each
    layer's codes stay on its layer's GPU and decode reads them there. pre_rope: every layer gets
    its own copy of the rotary angles on its GPU, and the shared table serves each GPU."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    model = make_tiny(family).cuda()
    ids = torch.randint(3, 90, (2, 150)).cuda()
    knobs = dict(quality=nq.E8_PRESETS["balanced"], recent_window=8, block=16, key_domain=key_domain, demote=0.2)

    def run():
        with nq.nexusquant_evict(model, **knobs) as s, torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=20,
                do_sample=False,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
        return out, s.cache

    one, _ = run()
    _split_over_two_gpus(model)
    two, cache = run()
    mods = sorted(nq.evict.attention_modules(model), key=lambda m: m.layer_idx)
    devices = [next(m.parameters()).device for m in mods]
    assert [d.index for d in devices] == [0, 1]
    for layer, dev in zip(cache.layers, devices):
        assert layer.device == dev
        for t in (
            layer.sink_k,
            layer.win_k,
            layer.win_valid,
            layer.k_center,
            layer.fine.keys.codes,
            layer.fine.values.scales,
            layer.coarse.keys.codes,
            layer.coarse.values.codes,
        ):
            assert t.device == dev
        if key_domain == "post_rope":
            assert layer.last_view.lazy_tiers  # decode attention read the codes (kernel on this GPU)
    torch.testing.assert_close(torch.stack(two.logits).cpu(), torch.stack(one.logits).cpu(), atol=1e-4, rtol=1e-4)
    assert torch.equal(two.sequences.cpu(), one.sequences.cpu())


@pytest.mark.parametrize("key_domain", ["post_rope", "pre_rope"])
def test_cache_file_loads_into_a_split_model(tmp_path, key_domain):
    """A cache saved on one GPU, loaded into the model split over two (load_cache puts each layer on
    its layer's GPU; the rotary table stays on the first and is mirrored), continues as on one GPU."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from transformers import DynamicCache

    from nexusquant.compat import with_cache

    model = make_tiny("llama").cuda()
    ids = torch.randint(3, 90, (1, 160)).cuda()
    prompt, cont = ids[:, :140], ids[:, 140:]
    knobs = dict(quality=nq.E8_PRESETS["balanced"], recent_window=8, block=16, key_domain=key_domain, demote=0.2)

    def continue_from(cache):  # 20 single-token steps: a block of 16 is compressed on the way
        with nq.nexusquant_evict(model, **knobs), torch.no_grad():
            return torch.cat(
                [
                    model(cont[:, i : i + 1], use_cache=True, **with_cache(model, cache)).logits
                    for i in range(cont.shape[1])
                ],
                1,
            )

    with nq.nexusquant_evict(model, **knobs), torch.no_grad():
        cache = DynamicCache()
        model(prompt, use_cache=True, **with_cache(model, cache))
    nq.save_cache(cache, tmp_path / "c.nqkv")
    want = continue_from(cache)
    _split_over_two_gpus(model)
    loaded = nq.load_cache(tmp_path / "c.nqkv", model)
    assert [layer.fine.keys.codes.device.index for layer in loaded.layers] == [0, 1]
    got = continue_from(loaded)
    assert [layer.fine.keys.codes.device.index for layer in loaded.layers] == [0, 1]
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=1e-4, rtol=1e-4)
