"""Compile a .cu file with NVRTC from the pip CUDA wheels (no GPU needed), to catch errors before
spending device time: python benches/nvrtc_check.py python/nexusquant/cuda/nexusquant.cu [-DNAME=V ...]"""

import ctypes
import glob
import os
import site
import sys

base = next(
    p
    for d in site.getsitepackages()
    for p in glob.glob(os.path.join(d, "nvidia", "cu1*"))
    if os.path.exists(os.path.join(p, "lib"))
)
lib = ctypes.CDLL(os.path.join(base, "lib", "libnvrtc.so.13"))
src = open(sys.argv[1]).read()
defines = sys.argv[2:]
prog = ctypes.c_void_p()
r = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), sys.argv[1].encode(), 0, None, None)
assert r == 0, r
opts = [b"--gpu-architecture=sm_90", b"--std=c++17", b"--fmad=false", f"-I{base}/include".encode()] + [
    d.encode() for d in defines
]
arr = (ctypes.c_char_p * len(opts))(*opts)
r = lib.nvrtcCompileProgram(prog, len(opts), arr)
n = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
lib.nvrtcGetProgramLog(prog, log)
print(log.value.decode())
print("result", r)
if r == 0:
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    print("cubin bytes", n.value)
