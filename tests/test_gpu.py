"""The CUDA path against the CPU reference (skipped without a CUDA device and CuPy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nexusquant as nq
from nexusquant.codec import as_codec_input
from tiny_models import make_tiny

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


@pytest.mark.parametrize("kbits,vbits", [(2, 2), (3, 2), (4, 4), (1, 1)])
@pytest.mark.parametrize("head_dim,group", [(128, 4), (64, 3), (256, 2)])
def test_decode_attention_kernel_matches_reference(kbits, vbits, head_dim, group):
    gpu = _gpu()
    bh, t = 6, 1500
    kc, vc = nq.E8Codec(head_dim, kbits, 0), nq.E8Codec(head_dim, vbits, 0)
    k = torch.randn(bh, t, head_dim, device="cuda")
    v = torch.randn(bh, t, head_dim, device="cuda")
    kcodes, kscales = gpu.encode(kc, k)
    vcodes, vscales = gpu.encode(vc, v)
    q_rot = torch.randn(bh, group, kc.padded_dim, device="cuda") * 0.1
    q_center = torch.randn(bh, group, device="cuda")
    valid = torch.rand(bh, t, device="cuda") > 0.1
    m, l, acc = gpu.decode_attention_partials(q_rot, q_center, kcodes, kscales, kbits, kc.residual_ratio or 1.0,
                                              vcodes, vscales, vbits, vc.residual_ratio or 1.0, valid)
    rm, rl, racc = gpu.decode_attention_partials_reference(kc, vc, q_rot, q_center, kcodes, kscales, vcodes, vscales, valid)

    def merged(m, l, acc):
        mm = m.amax(1)
        w = torch.exp(m - mm[:, None])
        return (w[..., None] * acc).sum(1) / (w * l).sum(1)[..., None]

    got, want = merged(m, l, acc), merged(rm, rl, racc)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generation_on_cuda_matches_cpu(family):
    model = make_tiny(family)
    ids = torch.randint(3, 90, (2, 150))
    knobs = dict(quality="balanced", recent_window=8, block=16)
    with nq.nexusquant_evict(model, **knobs), torch.no_grad():
        cpu = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
    model = model.cuda()
    with nq.nexusquant_evict(model, **knobs) as s, torch.no_grad():
        gpu_out = model.generate(ids.cuda(), max_new_tokens=20, do_sample=False, pad_token_id=0,
                                 output_scores=True, return_dict_in_generate=True)
        layer = s.cache.layers[0]
        assert layer.fine.keys.codes.is_cuda
        assert layer.last_view.lazy_tiers  # decode read the codes through the kernel
    a = torch.stack(cpu.scores)
    b = torch.stack(gpu_out.scores).cpu()
    torch.testing.assert_close(b, a, atol=2e-3, rtol=2e-3)


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
