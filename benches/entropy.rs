//! Throughput of the at-rest packer, the coders and the delta transforms on one core, against
//! memcpy of the same bytes in the same run.
//!
//! Data: 2-bit E8 codes + fp16 scales of 90 streams (30 layers × 3 KV heads) × 2048 tokens ×
//! head_dim 64, encoded from real SmolLM2-135M keys before RoPE when `$NQ_KVDATA/alice29_k_pre.npy`
//! exists (see `benches/entropy_study.py`), else from synthetic keys (a per-dimension bias plus
//! noise correlated along tokens). Every figure is bytes of raw codes + scales per second.
//!
//! Run: `cargo bench --bench entropy` (or `NQ_KVDATA=/path cargo bench --bench entropy`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use nexusquant::delta;
use nexusquant::entropy::{self, Coder, Layout, PackOptions, PlaneCoding};
use nexusquant::E8Codec;
use std::hint::black_box;

const STREAMS: usize = 90;
const TOKENS: usize = 2048;
const HEAD_DIM: usize = 64;

/// fp16 values of `STREAMS × TOKENS × HEAD_DIM`, real if available.
fn kv() -> (Vec<f16>, &'static str) {
    if let Ok(dir) = std::env::var("NQ_KVDATA") {
        let p = std::path::Path::new(&dir).join("alice29_k_pre.npy");
        if let Ok(b) = std::fs::read(&p) {
            // .npy v1: magic (6), version (2), header length u16, header, then the data.
            let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
            let data = &b[10 + hl..];
            let n = STREAMS * TOKENS * HEAD_DIM;
            if data.len() >= 2 * n {
                return (
                    data[..2 * n]
                        .chunks_exact(2)
                        .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                        .collect(),
                    "SmolLM2-135M alice29 k_pre",
                );
            }
        }
    }
    let mut s = 0x1234_5678u64;
    let mut r = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut out = Vec::with_capacity(STREAMS * TOKENS * HEAD_DIM);
    for _ in 0..STREAMS {
        let bias: Vec<f32> = (0..HEAD_DIM).map(|_| 4.0 * r()).collect();
        let mut prev = vec![0f32; HEAD_DIM];
        for _ in 0..TOKENS {
            for c in 0..HEAD_DIM {
                prev[c] = 0.6 * prev[c] + r();
                out.push(f16::from_f32(bias[c] + prev[c]));
            }
        }
    }
    (out, "synthetic keys")
}

fn bench(c: &mut Criterion) {
    let (x, source) = kv();
    eprintln!("data: {source}");
    let bits = 2u8;
    let codec = E8Codec::new(HEAD_DIM, bits, 0).unwrap();
    let rb = codec.code_bytes_per_vector();
    let enc = codec.encode(&x).unwrap();
    let per_codes = TOKENS * rb;
    let streams: Vec<(&[u8], &[u16])> = (0..STREAMS)
        .map(|i| {
            (
                &enc.codes[i * per_codes..(i + 1) * per_codes],
                &enc.scales[i * TOKENS..(i + 1) * TOKENS],
            )
        })
        .collect();
    let raw_bytes = (enc.codes.len() + 2 * enc.scales.len()) as u64;

    let mut g = c.benchmark_group("pack_2bit_90x2048x64");
    g.throughput(Throughput::Bytes(raw_bytes));
    g.sample_size(10);
    let mut flat = vec![0u8; raw_bytes as usize];
    let src = flat.clone();
    g.bench_function("memcpy", |b| {
        b.iter(|| flat.copy_from_slice(black_box(&src)))
    });
    let configs = [
        ("default(planes+auto)", PackOptions::default()),
        (
            "planes+rans",
            PackOptions {
                coding: PlaneCoding::Whole(Coder::Rans),
                ..Default::default()
            },
        ),
        (
            "planes+zstd3",
            PackOptions {
                coding: PlaneCoding::Whole(Coder::Zstd),
                ..Default::default()
            },
        ),
        (
            "raw+zstd3",
            PackOptions {
                layout: Layout::Raw,
                coding: PlaneCoding::Whole(Coder::Zstd),
                ..Default::default()
            },
        ),
    ];
    for (name, opts) in configs {
        let packed: Vec<Vec<u8>> = streams
            .iter()
            .map(|(c, s)| entropy::pack_codes(c, rb, s, bits, &opts).unwrap())
            .collect();
        let size: usize = packed.iter().map(|p| p.len()).sum();
        eprintln!(
            "{name}: {:.4} bits/dim",
            8.0 * size as f64 / (STREAMS * TOKENS * HEAD_DIM) as f64
        );
        g.bench_with_input(BenchmarkId::new("pack", name), &opts, |b, o| {
            b.iter(|| {
                for (c, s) in &streams {
                    black_box(entropy::pack_codes(c, rb, s, bits, o).unwrap());
                }
            })
        });
        g.bench_with_input(BenchmarkId::new("unpack", name), &packed, |b, p| {
            b.iter(|| {
                for q in p {
                    black_box(entropy::unpack_codes(q, entropy::DEFAULT_MAX_UNPACKED).unwrap());
                }
            })
        });
    }
    g.finish();

    // The coders alone on one plane (sign/shift bytes of all streams, column-major per stream).
    let plane: Vec<u8> = enc.codes.iter().skip(1).step_by(2).copied().collect();
    let mut g = c.benchmark_group("coders_sign_plane");
    g.throughput(Throughput::Bytes(plane.len() as u64));
    g.sample_size(10);
    let mut dst = vec![0u8; plane.len()];
    g.bench_function("memcpy", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&plane)))
    });
    g.bench_function("histogram", |b| {
        b.iter(|| black_box(entropy::histogram(black_box(&plane))))
    });
    for coder in [Coder::Rans, Coder::Zstd] {
        let e = entropy::encode(coder, &plane, 3).unwrap();
        g.bench_function(BenchmarkId::new("encode", coder.name()), |b| {
            b.iter(|| black_box(entropy::encode(coder, black_box(&plane), 3).unwrap()))
        });
        g.bench_function(BenchmarkId::new("decode", coder.name()), |b| {
            b.iter(|| entropy::decode_into(coder, black_box(&e), &mut dst).unwrap())
        });
    }
    g.finish();

    // Delta transforms on the whole code matrix (rows of 16 bytes): the vectorised forms
    // against the element-by-element references and memcpy.
    let m = &enc.codes;
    let mut g = c.benchmark_group("delta_rows_16B");
    g.throughput(Throughput::Bytes(m.len() as u64));
    g.sample_size(20);
    let mut out = vec![0u8; m.len()];
    g.bench_function("memcpy", |b| b.iter(|| out.copy_from_slice(black_box(m))));
    g.bench_function("delta_sub", |b| {
        b.iter(|| delta::delta_sub(black_box(m), &mut out, rb))
    });
    g.bench_function("delta_sub_ref", |b| {
        b.iter(|| black_box(delta::delta_sub_ref(black_box(m), rb)))
    });
    g.bench_function("undelta_sub", |b| {
        b.iter(|| delta::undelta_sub(black_box(&mut out), rb))
    });
    g.bench_function("undelta_sub_ref", |b| {
        b.iter(|| black_box(delta::undelta_sub_ref(black_box(m), rb)))
    });
    g.bench_function("zigzag8", |b| {
        b.iter(|| delta::zigzag8(black_box(&mut out)))
    });
    let cols: Vec<usize> = (1..rb).step_by(2).collect();
    let mut p = vec![0u8; m.len() / 2];
    g.bench_function("gather_columns(half)", |b| {
        b.iter(|| delta::gather_columns(black_box(m), rb, &cols, &mut p))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
