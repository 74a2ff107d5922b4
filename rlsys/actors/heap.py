"""How a CPU actor's C heap keeps the memory it frees (glibc's malloc settings), for actors that
allocate and free the same large blocks over and over: the learner's updates, an engine's reloads."""

from __future__ import annotations


def keep_freed_memory(mmap_threshold: int = 32 << 20) -> bool:
    """Ask glibc's malloc to keep the memory a CPU learner frees for its next use, instead of
    handing it back to the kernel and faulting it in again, zeroed, a page at a time.

    Every update allocates and frees the same activations, gradients and logit chunks. By default
    glibc serves blocks above a moving threshold (at most 32 MiB) with a fresh mmap each time and
    trims the heap's free top. Measured on the 2-vCPU Intel machine, SmolLM2, 32 samples: 1-2
    million minor page faults and 2-3 s of system time per update in one process; inside a whole
    run, where each fault costs 3-4 times more, ~9 s of system time in updates of 15-19 s. Here
    blocks up to 32 MiB (`mmap_threshold`; logit chunks stay below it, learner.logprob_chunk)
    come from the heap, whose free top is kept up to 2 GiB: 0.2 million
    faults and 0.4 s in one process, and the whole run's updates 13-17 s (`rlsys train` of
    benchmarks/end_to_end.py's SmolLM2 workload, 4 steps). Bounded: the heap holds at most the
    peak of what was live at once, reused from one update to the next. False where the C library
    is not glibc.

    A CPU engine (rlsys.actors.engine_worker) asks for 1 GiB: every weight push makes vLLM's
    reload allocate each layer's weights and their oneDNN-packed copies anew, the embedding above
    100 MB; kept on the heap, SmolLM2's fp32 reload took 0.255 s instead of 0.333 s (medians of 6,
    glibc 2.36, the AMD EPYC Zen 4 of docs/benchmarks.md)."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    ok = [libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold), libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1),  # an int: 2 GiB
          libc.mallopt(M_TOP_PAD, 64 << 20)]
    if not all(ok):
        raise RuntimeError(f"mallopt refused a setting (returned {ok}): M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD")
    return True
