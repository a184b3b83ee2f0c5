"""Run the codec benchmark and print its throughputs as a markdown table, with ratios to memcpy.

Usage: ``python benches/report_codec.py [--runs N] [-- criterion args...]``

Runs ``cargo bench --bench codec`` N times (default 3) and reports, for each benchmark, the median
over the runs of criterion's median time. On a machine shared with other work one run can be off by
tens of percent; the median of several is what the README quotes. Throughput is bytes of the 8 MiB
fp16 block per second; the ratio is to memcpy of the same block, measured in the same run.
Criterion writes its estimates under ``$CARGO_TARGET_DIR/criterion`` (default ``target/criterion``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

GROUP = "kv_block_8x4096x128_fp16"
BLOCK_BYTES = 8 * 4096 * 128 * 2
ROWS = (
    [("memcpy", "memcpy")]
    + [(f"encode {b}-bit", f"encode/{b}") for b in range(1, 5)]
    + [(f"decode {b}-bit", f"decode/{b}") for b in range(1, 5)]
    + [("Hadamard forward", "hadamard_forward"), ("Hadamard inverse", "hadamard_inverse")]
)


def median_ns(root: Path, bench: str) -> float | None:
    path = root / GROUP / bench / "new" / "estimates.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["median"]["point_estimate"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="benchmark runs; the median is reported")
    ap.add_argument("criterion_args", nargs="*", help="passed to criterion after --")
    args = ap.parse_args()

    repo = Path(__file__).resolve().parent.parent
    root = Path(os.environ.get("CARGO_TARGET_DIR", repo / "target")) / "criterion"
    cmd = ["cargo", "bench", "--bench", "codec", "--", *args.criterion_args]
    times: dict[str, list[float]] = {bench: [] for _, bench in ROWS}
    for run in range(args.runs):
        print(f"run {run + 1}/{args.runs}: {' '.join(cmd)}", file=sys.stderr)
        done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout, done.stderr, sep="\n", file=sys.stderr)
            return done.returncode
        for bench in times:
            t = median_ns(root, bench)
            if t is not None:
                times[bench].append(t)

    med = {bench: statistics.median(ts) for bench, ts in times.items() if ts}
    if "memcpy" not in med:
        print("no memcpy estimate found under", root, file=sys.stderr)
        return 1
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    print(f"One thread, {cpu_model()}, {rustc}; median of {args.runs} runs of `{' '.join(cmd)}`.\n")
    print("| operation | throughput (GiB/s) | ratio to memcpy |")
    print("|---|---:|---:|")
    for name, bench in ROWS:
        if bench not in med:
            continue
        gib = BLOCK_BYTES / med[bench] * 1e9 / 2**30
        ratio = med["memcpy"] / med[bench]
        print(f"| {name} | {gib:.3f} | {ratio:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
