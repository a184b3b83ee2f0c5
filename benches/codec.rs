//! Codec throughput on one core against memcpy of the same bytes, in the same run.
//!
//! The block is Llama-3-8B-shaped: 8 KV heads × 4096 tokens × head_dim 128, fp16 (8 MiB). Every
//! figure is bytes of that fp16 block per second: encode reads it, decode writes it, memcpy copies
//! it, and the Hadamard rows rotate (or unrotate) the same 4M values held as f32, counted at 2
//! bytes each so that they read on the same scale. Run: `cargo bench --bench codec` (criterion
//! prints each throughput; `python benches/report_codec.py` runs it and tabulates the ratios to
//! memcpy for the README).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use nexusquant::E8Codec;
use std::hint::black_box;

const HEADS: usize = 8;
const TOKENS: usize = 4096;
const HEAD_DIM: usize = 128;

fn block() -> Vec<f16> {
    // Deterministic pseudo-Gaussian data (sum of uniforms), like rotated KV coordinates.
    let mut s = 0x1234_5678u64;
    (0..HEADS * TOKENS * HEAD_DIM)
        .map(|_| {
            let mut acc = 0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                acc += (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            f16::from_f32(acc * 1.7)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let x = block();
    let bytes = (x.len() * 2) as u64;
    let mut g = c.benchmark_group("kv_block_8x4096x128_fp16");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(20);

    let mut dst = vec![f16::ZERO; x.len()];
    g.bench_function("memcpy", |b| b.iter(|| dst.copy_from_slice(black_box(&x))));

    for bits in 1..=4u8 {
        let codec = E8Codec::new(HEAD_DIM, bits, 0).unwrap();
        let n = HEADS * TOKENS;
        let mut codes = vec![0u8; n * codec.code_bytes_per_vector()];
        let mut scales = vec![0u16; n];
        g.bench_with_input(BenchmarkId::new("encode", bits), &bits, |b, _| {
            b.iter(|| {
                codec
                    .encode_into(black_box(&x), &mut codes, &mut scales)
                    .unwrap()
            })
        });
        let mut out = vec![f16::ZERO; x.len()];
        g.bench_with_input(BenchmarkId::new("decode", bits), &bits, |b, _| {
            b.iter(|| {
                codec
                    .decode_into(black_box(&codes), &scales, &mut out)
                    .unwrap()
            })
        });
    }

    // The rotation alone, row by row through the public API (what `rotate`/`unrotate` cost).
    let rot = E8Codec::new(HEAD_DIM, 2, 0).unwrap().rotation().clone();
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let mut yf = vec![0f32; xf.len()];
    g.bench_function("hadamard_forward", |b| {
        b.iter(|| {
            for (xr, yr) in black_box(&xf)
                .chunks_exact(HEAD_DIM)
                .zip(yf.chunks_exact_mut(HEAD_DIM))
            {
                rot.forward(xr, yr);
            }
        })
    });
    let mut back = vec![0f32; xf.len()];
    g.bench_function("hadamard_inverse", |b| {
        b.iter(|| {
            for (yr, br) in yf
                .chunks_exact_mut(HEAD_DIM)
                .zip(back.chunks_exact_mut(HEAD_DIM))
            {
                rot.inverse(black_box(yr), br);
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
