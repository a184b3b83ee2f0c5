#!/bin/bash
# The one device call behind benches/results/*pca_stage* (H200): tests, per-layer benches with the
# crossover sweep, the fair bench at 32K, and an ncu profile of both fused kernels at 32K.
export PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_transform.py tests/test_gpu.py 2>&1 | tail -15 | tee $OUT/test_gpu_transform_stage_h200.log
mkdir -p $OUT/b128 $OUT/b32 $OUT/fair
timeout 150 python3 benches/pca_keys_bench.py --rate 3 --tokens 131072 --reps 10 --sweep 1024,2048,4096,8192,16384,32768,65536 --out $OUT/b128 2>&1 | tail -25
timeout 60 python3 benches/pca_keys_bench.py --rate 3 --tokens 32768 --reps 20 --out $OUT/b32 2>&1 | tail -16
timeout 150 python3 benches/gpu_bench.py --phase fair --fair-context 32768 --fair-batches 1 --layers 8 --presets high --chunk-size 2048 --new-tokens 32 --warmup 4 --knobs key_codec=pca,key_domain=pre_rope,key_rate=3,value_bits=4 --out $OUT/fair 2>&1 | tail -30
timeout 80 ncu --clock-control none -k regex:"nq_attend_pca|nq_pca_coeffs" --launch-skip 1 --launch-count 3 --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis python3 benches/pca_keys_bench.py --rate 3 --tokens 32768 --reps 1 --out /tmp/ncu > $OUT/ncu_pca_stage_32k.txt 2>&1; grep -E "nq_|Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Block Limit|L2 Hit|Shared Memory Configuration Size" $OUT/ncu_pca_stage_32k.txt | head -60
