"""The scale configs' training path on tiny random models of their architectures: two DPO steps each, from the real
configs/*.yaml and sweep files shrunk only in size, planned by the sweep (Plan, sft.path = the tiny model) and
launched by the sweep's own job (TrainJob: accelerate launch, DeepSpeed from the sweep's JSON in its CPU variant).

    config               architecture  method                            here                  on the cluster
    gpt2.yaml            GPT-2         full, bf16 autocast, fp32 master  1 process             1 GPU
    smollm2.yaml         Llama         full, bf16 autocast, fp32 master  2 processes, DDP      1 GPU
    mistral7b.yaml       Mistral       LoRA r=16, grad. checkpointing    2 processes, ZeRO-3   8 GPUs, ZeRO-3
    mistral7b_full.yaml  Mistral       full, grad. checkpointing         2 processes, ZeRO-3   2 x 8 GPUs, ZeRO-3
                                                                         and ZeRO-2

The reference log-probs come from the sweep's own --precompute-ref job, launched the same way (under ZeRO-3 it runs a
sharded engine of its own); step 1's loss is log 2 when they match the policy's. Multi-node, DeepSpeed's bf16 and the
GPUs themselves cannot run on this machine: tests/test_sweep.py checks the multi-node command line.
"""
import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import train_dpo
from config import to_yaml
from conftest import REPO, SHARED_DATA
from jsonl import read_jsonl
from models import load_model, load_tokenizer
from slurm.jobs import TrainJob
from slurm.spec import load_sweep
from slurm.stages import Plan

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # accelerate launch, 1-2 processes, each test

# Sizes only: data, lengths, batches, steps (the schedule's warmup shrinks with them), evaluation.
SHRINK = {"data.path": str(SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"), "data.max_pairs": 24,
          "data.eval_fraction": 0.25, "tokenize.max_length": 128, "tokenize.max_prompt_length": 64,
          "train.max_steps": 2, "train.warmup_steps": 0, "train.batch_size": 2, "train.grad_accum": 1,
          "train.eval_batch_size": 4}
# DeepSpeed's bf16 needs a GPU: on CPU the DeepSpeed runs keep fp32 weights and no mixed precision.
DEEPSPEED_ON_CPU = ["overrides.model.dtype=float32", "overrides.train.mixed_precision='no'"]


def cpu_variant(deepspeed_config: str | None) -> str | None:
    """configs/accelerate/zeroN.json -> zeroN_cpu.json: the same ZeRO stage, bf16 off (DeepSpeed's bf16 needs a GPU)."""
    if deepspeed_config is None:
        return None
    gpu, cpu = REPO / deepspeed_config, REPO / deepspeed_config.replace(".json", "_cpu.json")
    gpu_zero, cpu_zero = (json.loads(p.read_text())["zero_optimization"] for p in (gpu, cpu))
    assert cpu_zero["stage"] == gpu_zero["stage"]
    assert cpu_zero.get("stage3_gather_16bit_weights_on_model_save") == gpu_zero.get(
        "stage3_gather_16bit_weights_on_model_save")
    return str(cpu.relative_to(REPO))


def sweep_run(tmp_path, monkeypatch, sweep_file: str, model_dir, processes: int, *overrides: str) -> dict:
    """Plan the sweep with one grid point starting from model_dir, then run its reference job and its one DPO run with
    TrainJob on CPU; returns the DPO job's resolved config, folder and run.json."""
    monkeypatch.chdir(REPO)  # the sweep resolves base and JSON paths from the launch directory, as on a cluster
    loaded = load_sweep(REPO / sweep_file, [
        f"root={tmp_path}", f"sft.path={model_dir}", "grid.loss.beta=[0.1]", "grid.train.seed=[0]",
        *(f"overrides.{key}={value}" for key, value in SHRINK.items()), *overrides])
    plan = Plan(loaded, sweep_file)
    targets = {t.stage: t for t in plan.targets if t.job is not None}
    assert "sft" not in targets and targets["dpo"].config.model.path == str(model_dir)
    launch = {**dataclasses.asdict(loaded.launch), "cpu_processes": processes,
              "deepspeed_config": cpu_variant(loaded.launch.deepspeed_config)}
    for kind in ("reference", "dpo"):
        job = targets[kind].job
        job.config_path.parent.mkdir(parents=True, exist_ok=True)
        job.config_path.write_text(to_yaml(job.config))
        TrainJob(str(REPO), str(REPO), gpus_per_node=0, launch=launch, grace_s=60)(targets[kind].spec)
    out = tmp_path / loaded.name / targets["dpo"].key
    return {"config": targets["dpo"].config, "out": out, "run": json.loads((out / "run.json").read_text()),
            "deepspeed": launch["deepspeed_config"]}


def check_two_steps(result: dict, log2_tolerance: float) -> None:
    """Completed, two finite training steps, step 1 at log 2 (policy = the cached reference), final/ loads."""
    run, out = result["run"], result["out"]
    assert run["status"] == "completed" and run["steps"] == 2
    assert run["reference"]["cache"] == "hit"  # filled by the sweep's --precompute-ref job
    train_rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in train_rows)
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=log2_tolerance)
    final = load_model(str(out / "final"), "float32")
    assert torch.isfinite(final(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()
    if run["world_size"] > 1:
        first, second = run["parameter_checksums"]
        assert first == second  # every process ends with the same weights (under ZeRO-3: gathered before summing)


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_gpt2_full_fine_tune_one_process(tmp_path, monkeypatch, tiny_model):
    result = sweep_run(tmp_path, monkeypatch, "configs/sweep_gpt2.yaml", tiny_model("gpt2"), 1)
    cfg = result["config"]
    assert (cfg.lora.r, cfg.model.dtype, cfg.train.mixed_precision, result["deepspeed"]) == (0, "float32", "bf16", None)
    check_two_steps(result, log2_tolerance=2e-3)  # bf16 autocast: the reference pass pads its batches differently
    before, after = load_file(str(tiny_model("gpt2") / "model.safetensors")), load_file(
        str(result["out"] / "final" / "model.safetensors"))
    assert after["transformer.h.0.attn.c_attn.weight"].dtype == torch.float32  # fp32 master weights saved as such
    assert changed(before, after) == set(before)


def test_smollm2_full_fine_tune_two_processes_ddp(tmp_path, monkeypatch, tiny_model):
    result = sweep_run(tmp_path, monkeypatch, "configs/sweep_smollm2.yaml", tiny_model("llama"), 2)
    cfg = result["config"]
    assert (cfg.lora.r, cfg.train.mixed_precision, cfg.tokenize.chat_template, result["deepspeed"]) == (
        0, "bf16", "model", None)
    check_two_steps(result, log2_tolerance=2e-3)
    assert result["run"]["world_size"] == 2
    before = load_file(str(tiny_model("llama") / "model.safetensors"))
    assert changed(before, load_file(str(result["out"] / "final" / "model.safetensors"))) == set(before)


def test_mistral7b_lora_zero3_gradient_checkpointing(tmp_path, monkeypatch, tiny_model):
    base_dir = tiny_model("mistral")
    result = sweep_run(tmp_path, monkeypatch, "configs/sweep_mistral7b.yaml", base_dir, 2,
                       *DEEPSPEED_ON_CPU)
    cfg, out, run = result["config"], result["out"], result["run"]
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules, cfg.train.gradient_checkpointing) == (
        16, 32, ["all-linear"], True)
    assert result["deepspeed"] == "configs/accelerate/zero3_cpu.json"
    base_size = sum(t.numel() for t in load_file(str(base_dir / "model.safetensors")).values())
    assert run["parameters"]["trainable"] > 0  # full sizes, though each process holds only shards
    assert run["parameters"]["total"] == base_size + run["parameters"]["trainable"]
    check_two_steps(result, log2_tolerance=1e-4)

    adapter = load_file(str(out / "final" / "adapter" / "adapter_model.safetensors"))
    lora_b = [k for k in adapter if "lora_B" in k]
    assert len(lora_b) == 2 * 7 and all(adapter[k].abs().sum() > 0 for k in lora_b)  # 2 layers x 7 linears; B was 0
    before, merged = load_file(str(base_dir / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert changed(before, merged) == {k for k in before if k.endswith("proj.weight")}  # merged into the linears only

    # final/ is the trained policy: it gives the held-out log-probs of the run's last evaluation
    tokenizer = load_tokenizer(str(out / "final"))
    _, eval_pairs = train_dpo.prepare_data(cfg, tokenizer, log=lambda *_: None)
    policy = train_dpo.add_logps_head(load_model(str(out / "final"), "float32")).eval()
    with torch.no_grad():
        logps = train_dpo.forward_logps(policy, train_dpo.collate(eval_pairs, tokenizer.pad_token_id))
    last_eval = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "eval"][-1]
    assert float(logps[:len(eval_pairs)].mean()) == pytest.approx(last_eval["logps/chosen"], rel=1e-4)


@pytest.mark.parametrize("stage, swap", [(3, []), (2, ["launch.deepspeed_config=configs/accelerate/zero2.json"])],
                         ids=["zero3-as-configured", "zero2"])
def test_mistral7b_full_fine_tune_deepspeed(tmp_path, monkeypatch, tiny_model, stage, swap):
    result = sweep_run(tmp_path, monkeypatch, "configs/sweep_mistral7b_full.yaml", tiny_model("mistral"), 2,
                       *DEEPSPEED_ON_CPU, *swap)
    cfg = result["config"]
    assert (cfg.lora.r, cfg.train.gradient_checkpointing) == (0, True)
    assert result["deepspeed"] == f"configs/accelerate/zero{stage}_cpu.json"
    assert result["run"]["parameters"]["trainable"] == result["run"]["parameters"]["total"]
    check_two_steps(result, log2_tolerance=1e-4)
    before = load_file(str(tiny_model("mistral") / "model.safetensors"))
    assert changed(before, load_file(str(result["out"] / "final" / "model.safetensors"))) == set(before)
