"""Run the tests as on a CPU with less than this one has: `RLSYS_EMULATE_ISA=avx2 | avx512 |
avx512_bf16` with this folder on PYTHONPATH (tests/isa/run does both), in every Python process
the tests start (Ray workers, vLLM engine and worker processes, reward children).

What it changes is what the software CHOOSES by instruction set, which is where the test suite
can come to depend on one CPU: torch's own kernels (ATEN_CPU_CAPABILITY), oneDNN's
(ONEDNN_MAX_CPU_ISA), and what torch.cpu reports to the libraries that branch on it (vLLM picks
its kernel build, _C_AVX2 / _C_AVX512 / _C, and whether small bf16 linear layers go to its AMX
kernel, which keeps their bias in float32). It does not change the hardware: an emulated AVX2
run still executes on this CPU, so numerics that differ only in silicon are not covered.

    avx2         x86-64 with AVX2 only: no AVX-512, no bf16 instructions, no AMX
    avx512       AVX-512 without bf16 instructions or AMX (Skylake/Cascade Lake servers, Zen 4 without bf16 use)
    avx512_bf16  AVX-512 with bf16 instructions, no AMX (AMD Zen 4/5)
"""

import os

_LEVELS = {
    # (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, avx512, avx512_bf16, amx)
    "avx2": ("avx2", "AVX2", False, False, False),
    "avx512": ("avx512", "AVX512_CORE", True, False, False),
    "avx512_bf16": ("avx512", "AVX512_CORE_BF16", True, True, False),
}

_level = os.environ.get("RLSYS_EMULATE_ISA")
if _level:
    if _level not in _LEVELS:
        raise SystemExit(f"RLSYS_EMULATE_ISA={_level!r}: choose one of {sorted(_LEVELS)}")
    aten, onednn, avx512, bf16, amx = _LEVELS[_level]
    # Read when torch / oneDNN load, so before any import of torch in this process.
    os.environ["ATEN_CPU_CAPABILITY"] = aten
    os.environ["ONEDNN_MAX_CPU_ISA"] = onednn
    import torch.cpu

    torch.cpu._is_avx512_supported = lambda: avx512
    torch.cpu._is_avx512_bf16_supported = lambda: bf16
    torch.cpu._is_amx_tile_supported = lambda: amx
    torch.cpu._is_amx_fp16_supported = lambda: amx
