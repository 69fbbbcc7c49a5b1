"""host.py: the precision and engine defaults that follow the machine. The CPU flags are FAKED here with
$DPO_FAKE_CPU_FLAGS (both branches run on any host); the thread binding is read back from a real vLLM start in
tests/test_generate.py."""
import os

import pytest

import host

SMOLLM2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}


@pytest.fixture
def cpu(monkeypatch):
    """Fake this CPU's flags (and no CUDA) for one test."""
    monkeypatch.setattr(host, "on_cuda", lambda: False)

    def fake(flags: str):
        monkeypatch.setenv(host.FAKE_FLAGS_ENV, flags)
    return fake


def test_avx2_only_cpu_gets_fp32_everywhere(cpu):
    cpu("fpu sse2 avx avx2 fma f16c")  # FAKED: AMD EPYC Zen 3
    assert not host.native_bf16()
    assert host.resolve_mixed_precision("auto")[0] == "no"
    assert host.engine_dtype("auto", "generate")[0] == "float32"
    assert host.engine_dtype("auto", "judge")[0] == "float32"
    assert "no native bf16" in host.describe() and "FAKED" in host.describe()


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_native_bf16_cpu_gets_bf16_but_the_judge_stays_fp32(cpu, flag):
    cpu(f"avx2 avx512f {flag}")  # FAKED
    assert host.native_bf16()
    precision, why = host.resolve_mixed_precision("auto")
    assert precision == "bf16" and flag in why
    assert host.engine_dtype("auto", "generate")[0] == "bfloat16"
    assert host.engine_dtype("auto", "judge")[0] == "float32"  # bf16 logits tie the verdict letters


def test_explicit_values_are_kept(cpu):
    cpu("avx2")
    assert host.resolve_mixed_precision("bf16") == ("bf16", "as configured")
    assert host.engine_dtype("bfloat16", "generate")[0] == "bfloat16"


def test_real_flags_come_from_proc_cpuinfo(monkeypatch):
    monkeypatch.delenv(host.FAKE_FLAGS_ENV, raising=False)
    line = next(l for l in open("/proc/cpuinfo") if l.startswith("flags"))  # this machine's own, read here
    assert host.cpu_flags() == set(line.split(":", 1)[1].split())
    assert (host.cpu_bf16_flag() is not None) == any(f" {f}" in line for f in ("avx512_bf16", "amx_bf16"))
    assert "FAKED" not in host.describe()


def test_a_resumed_run_keeps_what_auto_became_when_it_started(cpu):
    cpu("avx512f avx512_bf16")  # FAKED: this node has bf16, the one the run started on did not
    assert host.resolve_mixed_precision("auto", pinned="no")[0] == "no"
    assert host.resolve_mixed_precision("auto", pinned=None)[0] == "bf16"
    assert host.resolve_mixed_precision("bf16", pinned="no")[0] == "bf16"  # an explicit value is the config's


def test_vllm_gets_every_core_the_job_owns():
    assert host.cpu_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert host.vllm_cpu_env([0, 1]) == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    bound = host.vllm_cpu_env()["VLLM_CPU_OMP_THREADS_BIND"]  # this process's own affinity, one CPU per core
    cpus = [int(c) for part in bound.split(",") for c in (range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))]
    assert set(cpus) <= os.sched_getaffinity(0) and len(cpus) >= 1
    assert host.one_per_core([0]) == [0]


def test_kv_cache_is_sized_for_the_batch_and_capped_by_memory():
    # 64 sequences of ~370 tokens in fp32: 45 KiB a token -> 1.1 GiB: more than the old fixed 1 GiB
    gib, why = host.kv_cache_gib(SMOLLM2, "float32", 64 * 370, mem_available=24 * 2**30)
    assert gib == 2 and "45 KiB" in why
    assert host.kv_cache_gib(SMOLLM2, "bfloat16", 64 * 370, mem_available=24 * 2**30)[0] == 1
    assert host.kv_cache_gib(SMOLLM2, "float32", 10**7, mem_available=24 * 2**30)[0] == 6  # a quarter of 24 GiB
    assert host.kv_cache_gib(SMOLLM2, "float32", 10, mem_available=2**30)[0] == 1


def test_engine_auto_follows_the_measured_table(cpu):
    cpu("avx2 fma")  # FAKED AVX2 host: vLLM fp32 on both cores is ~3x HF
    name, why = host.choose_engine(True, 64, 128, "float32")
    assert name == "vllm" and "AVX2" in why and "bench_generate" in why
    assert host.choose_engine(True, 2, 16, "float32")[0] == "hf"  # vLLM's 30-50 s start is not worth it
    assert host.choose_engine(False, 640, 128, "float32") == ("hf", "vLLM is not installed")
    cpu("avx512f avx512_bf16")  # FAKED
    assert "native-bf16" in host.choose_engine(True, 64, 128, "bfloat16")[1]
