#!/bin/bash
# The last device call: the GPU tests, then the fair bench at 128K (benches/results/*pca_stage*).
export PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfs tests/test_gpu_transform.py tests/test_gpu.py 2>&1 | tail -25 | tee $OUT/test_gpu_transform_stage_h200_final.log
mkdir -p $OUT/fair128
timeout 170 python3 benches/gpu_bench.py --phase fair --fair-context 131072 --fair-batches 1 --layers 8 --presets high --chunk-size 2048 --new-tokens 32 --warmup 4 --knobs key_codec=pca,key_domain=pre_rope,key_rate=3,value_bits=4 --out $OUT/fair128 2>&1 | grep -E "^\|" | head -14
