"""Measuring tools of scripts/benchmark.py: timing (wall and process CPU time), peak memory, FLOPs, the device's
peak throughput and a description of the machine."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# dense (no sparsity) peak TFLOP/s from the data sheets: {name fragment: {precision: TFLOP/s}}
GPU_PEAKS = {"H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},  # fp32: TF32 tensor cores
             "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
             "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}}


def tensor_bytes(tensors: Any) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def progress(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], n: int, device: torch.device) -> list[tuple[float, float]]:
    """(wall seconds, process CPU seconds) of each of `n` calls of `fn`."""
    out = []
    for _ in range(n):
        synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        out.append((time.perf_counter() - wall, time.process_time() - cpu))
    return out


def peak_step_memory(fn: Callable[[], Any], static: int, device: torch.device) -> int:
    """Peak bytes during one call of `fn`: the CUDA allocator's peak, or on CPU `static` (what the step holds
    before it starts) plus the peak of the running sum of the CPU allocator's allocations and frees that the
    profiler records during the call."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return static + peak


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# operators that run the dense kernels (matrix products, convolutions, fused attention); what a compiler that
# fuses elementwise and normalisation work leaves as it is (in training, inductor calls these same kernels)
DENSE_OPERATORS = re.compile(r"aten::(mm|addmm|bmm|baddbmm|_?addmm_activation|.*convolution.*|_slow_conv.*"
                             r"|_scaled_dot_product.*|_flash_attention.*|_efficient_attention.*)$")


def dense_breakdown(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Where one call of `fn` spends its time: the seconds in dense kernels (DENSE_OPERATORS) and in everything
    else (elementwise, normalisation, copies, framework overhead), by the profiler's self time of each operator
    (CPU time on CPU, device time on CUDA). ``fusion_bound`` = total / dense is the largest speed-up that fusing or
    removing everything but the dense kernels could give (Amdahl's law)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    dense = total = 0.0
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        total += us
        if DENSE_OPERATORS.match(event.key):
            dense += us
    return {"dense_s": round(dense / 1e6, 4), "other_s": round((total - dense) / 1e6, 4),
            "dense_share": round(dense / total, 4) if total else 0.0,
            "fusion_bound": round(total / dense, 3) if dense else float("inf")}


def device_peak_tflops(device: torch.device, precision: str) -> dict[str, Any]:
    """The device's dense peak TFLOP/s at `precision`, and where the number comes from.

    GPUs in GPU_PEAKS: the data sheet. Otherwise it is measured: the best of 5 products of 2048 x 2048 matrices,
    by wall time (``tflops``, the attainable throughput under the machine's load at the time) and, on CPU, by
    process CPU time (``cpu_tflops``: per busy core, which other processes on a shared machine hardly change).
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peaks in GPU_PEAKS.items():
            if fragment in name:
                return {"tflops": peaks[precision], "source": f"data sheet ({fragment}, dense {precision})"}
    a = torch.randn(2048, 2048, device=device, dtype=DTYPES[precision] or torch.float32)
    a @ a
    times = time_calls(lambda: a @ a, 5, device)
    flops = 2 * 2048 ** 3
    peak = {"tflops": flops / min(t[0] for t in times) / 1e12,
            "source": f"measured: best of 5 {precision} 2048^3 matrix products in this run"}
    if device.type == "cpu":
        peak["cpu_tflops"] = flops / min(t[1] for t in times) / 1e12
    return peak


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average": [round(x, 2) for x in os.getloadavg()]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable"))
        return int(line.split()[1]) * 1024
    return None
