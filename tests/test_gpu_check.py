"""bench/gpu_check.py, the check prepared for the first GPU, run on CPU with a tiny model so that it cannot rot."""
import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_the_gpu_check_runs_on_cpu_tiny(tmp_path):
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny", "--out", tmp_path],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["planner_gpu"] == "cpu" and data["peak_tflops_measured"] > 0
    rows = data["training"]
    assert {(r["precision"], r["lora"], r["checkpointing"]) for r in rows} == {
        (p, lora, ckpt) for p in ("autocast-bf16", "pure-bf16") for lora in (0, 16) for ckpt in (False, True)}
    for r in rows:
        assert r["finite"] and r["step_s"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1, r
        assert r["planned_gib"] > 0, r
    model = data["models"]["tiny-llama"]
    assert model["head_parity"]["within_bf16_tolerance"], model
    assert model["inference"]["reference_tokens_per_s"] > 0 and model["inference"]["generate_tokens_per_s"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| tiny-llama | 0.14M | pure-bf16 | 16 | yes |" in table and "planned/measured" in table


def test_the_gpu_check_refuses_cuda_without_a_gpu_and_unknown_models(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.xfail("a GPU is here: --device cuda is allowed")
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cuda", "--out", tmp_path], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "no CUDA device here" in result.stderr.splitlines()[-1]
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny", "--only", "gpt5",
                             "--out", tmp_path], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--only gpt5: not one of tiny-llama" in result.stderr.splitlines()[-1]
