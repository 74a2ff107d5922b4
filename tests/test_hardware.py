"""The machine's FLOP/s peak from its instruction set (fake /proc/cpuinfo of three machines), the
measured matmul roofline, and the benchmarks' hardware file with and without an override."""

from __future__ import annotations

import math

import pytest

from rlsys.observe.hardware import CpuInfo, clock_ghz, estimate, isa_rate, matmul_roofline, physical_cores

BASE = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov sse sse2 ssse3 sse4_1 sse4_2 popcnt"
AVX512 = "avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512vbmi avx512_vbmi2"

ZEN5 = f"""processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC 9R45
cpu MHz\t\t: 2600.000
flags\t\t: {BASE} avx avx2 fma f16c {AVX512} avx512_bf16 avx512_vp2intersect

processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: something else entirely
"""
ZEN4 = ZEN5.replace("cpu family\t: 26", "cpu family\t: 25").replace(" avx512_vp2intersect", "")
SAPPHIRE = f"""processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Processor
cpu MHz\t\t: 2599.998
flags\t\t: {BASE} avx avx2 fma {AVX512} avx_vnni avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8
"""
AVX2_ONLY = f"""processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Core(TM) i7-8700
cpu MHz\t\t: 3200.000
flags\t\t: {BASE} avx avx2 fma f16c
"""


def test_cpuinfo_reads_the_first_processor():
    cpu = CpuInfo.parse(ZEN5)
    assert cpu.vendor == "AuthenticAMD" and cpu.family == 26 and cpu.mhz == 2600.0
    assert "avx512_vp2intersect" in cpu.flags and "something" not in cpu.flags


@pytest.mark.parametrize("text, fp32, bf16, bf16_unit", [
    (ZEN5, 64, 128, "AVX512_BF16"),
    (ZEN4, 32, 64, "AVX512_BF16"),     # Zen 4: 512-bit ops on 256-bit pipes
    (SAPPHIRE, 64, 1024, "AMX"),
    (AVX2_ONLY, 32, 32, "through fp32"),
    ("flags\t: sse sse2\n", 8, 8, "through fp32"),
])
def test_flop_per_cycle_from_the_flags(text, fp32, bf16, bf16_unit):
    rate = isa_rate(CpuInfo.parse(text))
    assert (rate.float32, rate.bfloat16) == (fp32, bf16)
    assert bf16_unit in rate.bfloat16_unit


def test_estimate_is_rate_x_cores_x_clock():
    zen5 = estimate(CpuInfo.parse(ZEN5), cores=2, ghz=2.6)
    assert math.isclose(zen5["float32"], 332.8e9) and math.isclose(zen5["bfloat16"], 665.6e9)
    amx = estimate(CpuInfo.parse(SAPPHIRE), cores=2, ghz=2.6)
    assert math.isclose(amx["bfloat16"], 1024 * 2 * 2.6e9) and amx["float32"] == zen5["float32"]
    laptop = estimate(CpuInfo.parse(AVX2_ONLY), cores=6, ghz=3.2)
    assert math.isclose(laptop["float32"], 32 * 6 * 3.2e9) and laptop["bfloat16"] == laptop["float32"]


def test_physical_cores_and_clock_from_sysfs(tmp_path):
    for cpu, core in ((0, 0), (1, 0), (2, 1), (3, 1)):  # two cores with two hyper-threads each
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text("0\n")
        (topo / "core_id").write_text(f"{core}\n")
    assert physical_cores([0, 1, 2, 3], tmp_path) == 2
    assert physical_cores([0, 2], tmp_path) == 2 and physical_cores([0, 1], tmp_path) == 1
    cpu = CpuInfo.parse(SAPPHIRE)
    assert clock_ghz(cpu, tmp_path) == (cpu.mhz / 1e3, "/proc/cpuinfo cpu MHz")
    (tmp_path / "cpu0" / "cpufreq").mkdir()
    (tmp_path / "cpu0" / "cpufreq" / "cpuinfo_max_freq").write_text("3800000\n")
    assert clock_ghz(cpu, tmp_path) == (3.8, "cpufreq cpuinfo_max_freq")


def test_measured_roofline_is_restored_threads_and_a_real_size():
    import torch

    threads = torch.get_num_threads()
    roof = matmul_roofline(("float32",), device="cpu", seconds=0.2, repeats=2)
    assert roof["n"]["float32"] in (1024, 2048, 4096, 8192) and roof["device"] == "cpu"
    assert roof["other_load_cores"] is None or roof["other_load_cores"] >= 0
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("flops, n", [(1e10, 1024), (1e12, 4096)])
def test_roofline_arithmetic_on_a_machine_of_known_speed(monkeypatch, flops, n):
    """A fake clock in which an n x n product takes 2 n^3 / flops seconds: the roofline must read
    exactly `flops`, at the first size whose product takes >= 50 ms (1024 at 1e10: 0.21 s; at 1e12:
    2048 takes 17 ms, 4096 takes 0.14 s)."""
    import torch

    from rlsys.observe import hardware

    clock = [0.0]

    def matmul(a, b):
        clock[0] += 2 * a.shape[0] ** 3 / flops
    monkeypatch.setattr(hardware.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(torch, "matmul", matmul)
    monkeypatch.setattr(torch, "randn", lambda *shape, **kw: torch.empty(1).expand(*shape))  # no real n x n
    roof = hardware.matmul_roofline(("float32",), device="cpu", seconds=10, repeats=3)
    assert roof["float32"] == pytest.approx(flops, rel=1e-9) and roof["n"]["float32"] == n


def test_hardware_file_estimate_or_override(tmp_path, monkeypatch):
    from benchmarks.common import hardware

    hw = hardware()  # the shipped file: no override, the peak is this machine's estimate
    assert hw["peak_source"].startswith("estimate") and hw["peak_tflops"]["float32"] > 0
    assert hw["cpu_estimate"]["cores"] >= 1
    own = tmp_path / "hw.yaml"
    own.write_text("peak_tflops: {float32: 495, bfloat16: 989}\n"
                   "links: {nvlink_gb_per_s: 450, infiniband_gb_per_s: 50, sync_path: nvlink}\n")
    monkeypatch.setenv("RLSYS_HARDWARE", str(own))
    hw = hardware()
    assert hw["peak_source"] == "override in hw.yaml" and hw["peak_tflops"]["bfloat16"] == 989


def test_best_of_keeps_the_highest_per_precision():
    from rlsys.observe.hardware import best_of

    a = {"float32": 100.0, "bfloat16": 900.0, "n": {"float32": 2048, "bfloat16": 4096}, "other_load_cores": 1.0}
    b = {"float32": 300.0, "bfloat16": 500.0, "n": {"float32": 1024, "bfloat16": 2048}, "other_load_cores": 0.0}
    best = best_of(a, b)
    assert (best["float32"], best["bfloat16"]) == (300.0, 900.0)
    assert best["n"] == {"float32": 1024, "bfloat16": 4096} and best["other_load_cores"] == 0.0
    assert len(best["measurements"]) == 2
