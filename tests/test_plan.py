"""The memory planner (slurm/plan.py): every config plans, the verdicts the issue names, exact parameter counts, the
activation formula against what autograd really saves, suggestions that fit, and the command line's exit codes."""
import contextlib
import json
import math
import subprocess
import sys

import pytest

import train_dpo
from conftest import REPO, run_main
from config import UserInputError, load_config
from slurm import memory, plan, spec

TRAINING_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("sweep_"))
SWEEP_CONFIGS = sorted((REPO / "configs").glob("sweep_*.yaml"))
MISTRAL = "configs/mistral7b.yaml"


def test_the_globs_find_configs():
    assert TRAINING_CONFIGS and SWEEP_CONFIGS


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_every_training_config_loads_and_plans(path):
    cfg = load_config(path)
    for gpus, zero in ((1, 0), (8, 2), (8, 3)):
        est = memory.estimate(cfg, gpus, zero_stage=zero)
        assert math.isfinite(est.total_gib) and est.total_gib > 0
        assert all(math.isfinite(v) and v >= 0 for v in est.components.values())
    lines = plan.plan_lines(cfg, "h100-80gb", 8, zero_stage=3)
    assert any(line.startswith("fits h100-80gb: ") for line in lines)


@pytest.mark.parametrize("path", SWEEP_CONFIGS, ids=lambda p: p.name)
def test_every_sweep_config_loads_and_plans(path):
    sw = spec.load_sweep(path)
    lines = plan.plan_sweep(str(path))
    job_lines = [line for line in lines if " GiB per process, " in line]
    assert len(job_lines) == len(spec.training_jobs(sw, str(path)))
    for line in job_lines:
        total = float(line.split(" GiB per process")[0].split()[-1])
        assert math.isfinite(total) and total > 0, line


def test_mistral_full_finetune_on_one_h100_does_not_fit():
    """Full fine-tuning as this project does it keeps fp32 master weights (FACTS.md: bf16 weights lose DPO-sized
    updates): model.dtype=float32 without DeepSpeed, or DeepSpeed bf16 (fp32 masters in the optimizer). Either way
    16 B per parameter, 108 GiB for 7.24B, before any activation."""
    fp32_masters = memory.estimate(load_config(MISTRAL, ["lora.r=0", "model.dtype=float32"]), 1, zero_stage=0,
                                 gpu="h100-80gb")
    deepspeed_bf16 = memory.estimate(load_config(MISTRAL, ["lora.r=0"]), 1, zero_stage=3, gpu="h100-80gb")
    for est in (fp32_masters, deepspeed_bf16):
        assert memory.verdict(est) == "no" and not memory.fits(est)
        assert est.components["weights"] + est.components["gradients"] + est.components["optimizer state"] > 100


def test_the_full_finetune_config_on_one_h100_says_no_and_suggests_what_fits():
    """configs/mistral7b_full.yaml as given, on one 80 GB GPU: the command-line verdict is no, and the suggested
    setting, planned again, fits."""
    result = subprocess.run([sys.executable, "slurm/plan.py", "--config", "configs/mistral7b_full.yaml", "--gpu",
                             "h100-80gb", "--gpus", "1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fits h100-80gb: no" in result.stdout and "suggestion:" in result.stdout
    cfg = load_config("configs/mistral7b_full.yaml")
    suggestion = plan.suggest(cfg, "h100-80gb", gpus_per_node=1, nodes=1)
    assert suggestion is not None and memory.fits(suggestion.estimate)


def test_pure_bf16_full_finetune_is_planned_as_it_runs_and_flagged():
    """configs/mistral7b.yaml with lora.r=0 and no DeepSpeed trains the bf16 weights themselves: 2 + 2 + 4 bytes per
    parameter, plus AdamW's foreach sqrt(v) at the step. The planner counts that (it may fit) and says why it is not a
    real full fine-tune."""
    est = memory.estimate(load_config(MISTRAL, ["lora.r=0"]), 1, zero_stage=0, gpu="h100-80gb")
    assert est.components["weights"] == pytest.approx(7.2417e9 * 2 / 2 ** 30, rel=1e-3)
    assert est.components["optimizer state"] == pytest.approx(2 * est.components["weights"])
    assert est.total_gib > 8 * 7.24e9 / 2 ** 30
    assert any("fp32 masters" in note for note in est.notes)


def test_mistral_lora_zero3_with_checkpointing_fits_eight_h100():
    cfg = load_config(MISTRAL, ["lora.r=16", "train.gradient_checkpointing=true"])
    est = memory.estimate(cfg, 8, zero_stage=3, gpu="h100-80gb")
    assert memory.verdict(est) == "yes"
    assert est.trainable == pytest.approx(41.9e6, rel=0.005)


def test_gpt2_fits_one_h100():
    assert memory.verdict(memory.estimate(load_config("configs/gpt2.yaml"), 1, gpu="h100-80gb")) == "yes"


@pytest.mark.parametrize("source, published", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 134.5e6), ("gpt2", 124.4e6), ("mistralai/Mistral-7B-v0.1", 7.24e9),
    ("meta-llama/Meta-Llama-3-8B-Instruct", 8.03e9), ("models/smollm2-135m-instruct", 134.5e6),
])
def test_parameter_counts_match_published_numbers_and_the_real_architecture(source, published, default_model_dir):
    shape = memory.model_shape(str(REPO / source) if source.startswith("models/") else source)
    assert shape.parameters() == pytest.approx(published, rel=0.005)
    config = json.loads((REPO / source / "config.json").read_text()) if source.startswith("models/") \
        else memory.HUB_CONFIGS[source]
    assert shape.parameters() == memory.meta_parameter_count(config)  # transformers' own modules, on the meta device


def test_lora_parameter_count_matches_peft():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = memory.HUB_CONFIGS["HuggingFaceTB/SmolLM2-135M-Instruct"]
    shape = memory.ModelShape.from_config(config)
    for targets in (["all-linear"], ["q_proj", "v_proj"]):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
        model = get_peft_model(model, LoraConfig(r=16, target_modules=targets[0] if targets == ["all-linear"] else targets,
                                                 task_type="CAUSAL_LM"))
        assert shape.lora_parameters(16, targets) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_zero3_memory_per_gpu_falls_as_gpus_rise():
    cfg = load_config(MISTRAL, ["lora.r=0"])
    totals = [memory.estimate(cfg, n, zero_stage=3).total_gib for n in (1, 2, 4, 8, 16, 32)]
    assert all(a > b for a, b in zip(totals, totals[1:])), totals


@pytest.mark.parametrize("path, overrides", [("configs/default.yaml", []), (MISTRAL, []), (MISTRAL, ["lora.r=0"]),
                                             ("configs/gpt2.yaml", [])])
def test_gradient_checkpointing_lowers_activations(path, overrides):
    on = memory.estimate(load_config(path, overrides + ["train.gradient_checkpointing=true"]), 8, zero_stage=2)
    off = memory.estimate(load_config(path, overrides + ["train.gradient_checkpointing=false"]), 8, zero_stage=2)
    assert on.components["activations"] < off.components["activations"]
    assert on.total_gib <= off.total_gib


@pytest.mark.parametrize("overrides, gpu", [(["lora.r=0", "model.dtype=float32"], "h100-80gb"),
                                            (["lora.r=0"], "a10g"), (["train.gradient_checkpointing=false"], "l4")])
def test_the_suggestion_for_a_no_fit_case_fits_when_estimated_again(overrides, gpu):
    cfg = load_config(MISTRAL, overrides)
    assert memory.verdict(memory.estimate(cfg, 1, gpu=gpu)) == "no"
    s = plan.suggest(cfg, gpu)
    assert s is not None
    again = memory.estimate(load_config(MISTRAL, overrides + s.overrides), s.gpus, gpu=gpu, deepspeed=s.deepspeed)
    assert memory.verdict(again) == "yes"
    global_batch = cfg.train.batch_size * cfg.train.grad_accum
    changed = load_config(MISTRAL, overrides + s.overrides)
    assert changed.train.batch_size * s.gpus * changed.train.grad_accum == global_batch  # the same experiment


def test_lora_is_suggested_only_when_nothing_else_fits():
    cfg = load_config(MISTRAL, ["lora.r=0"])
    kept = plan.suggest(cfg, "h100-80gb")
    assert kept is not None and not kept.changes_experiment and "lora.r=16" not in kept.overrides
    small = memory.Gpu("small", 6.0)
    s = plan.suggest(cfg, small, max_nodes=1)
    assert s is not None and s.changes_experiment and "lora.r=16" in s.overrides
    assert any("CHANGES THE EXPERIMENT" in line for line in plan.suggestion_lines(s, MISTRAL))


def test_unknown_gpu_is_an_error_naming_the_choices():
    with pytest.raises(UserInputError, match="unknown GPU 'x100'.*h100-80gb.*h200.*a100-40gb.*cpu"):
        memory.get_gpu("x100")


def test_deepspeed_json_files_give_their_stage():
    for path in sorted((REPO / "configs" / "accelerate").glob("*.json")):
        ds = memory.DeepSpeed.from_json(path)
        assert ds.stage == json.loads(path.read_text())["zero_optimization"]["stage"]
    assert memory.DeepSpeed.from_json(REPO / "configs/accelerate/zero2.json").overlap_comm is True


def test_sweep_plan_uses_the_sweep_gpus_and_deepspeed_config():
    sw = spec.load_sweep(REPO / "configs/sweep_mistral7b.yaml")
    stage = memory.DeepSpeed.from_json(REPO / sw.launch.deepspeed_config).stage
    lines = plan.plan_sweep("configs/sweep_mistral7b.yaml", gpu="h200")
    assert any(f"{sw.slurm.gpus_per_node} x h200" in line and f"ZeRO-{stage}" in line for line in lines)
    fewer = plan.plan_sweep("configs/sweep_mistral7b.yaml", ["slurm.gpus_per_node=1"], gpu="h200")
    assert any(" 1 x h200" in line for line in fewer)


# The activation formula, term by term, against the bytes autograd saves for a real model (two layers' difference:
# one block), on CPU; autocast's saved weight copies are added per block as estimate() adds them.
LLAMA = dict(model_type="llama", num_hidden_layers=2, vocab_size=512, hidden_size=128, intermediate_size=320,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
GPT2 = dict(model_type="gpt2", n_layer=2, vocab_size=512, n_embd=128, n_head=4)


def saved_bytes_per_block_token(config: dict, overrides: list[str], rows: int = 4, seq: int = 32) -> float:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from train_dpo import add_logps_head, disable_dropout

    cfg = load_config(None, overrides)
    totals = []
    for layers in (2, 3):
        torch.manual_seed(0)
        key = "n_layer" if config["model_type"] == "gpt2" else "num_hidden_layers"
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**config, key: layers}))
        model = add_logps_head(model.to(getattr(torch, cfg.model.dtype)))
        disable_dropout(model)
        if cfg.lora.r:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_dropout=cfg.lora.dropout, task_type="CAUSAL_LM",
                                                     target_modules="all-linear"))
        model.train()
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 100, (rows, seq))
        mask = torch.ones_like(ids)
        mask[1:, seq // 2:] = 0  # padded rows, as every DPO batch has
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :seq // 4] = -100
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.train.mixed_precision == "bf16" \
            else contextlib.nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            model(input_ids=ids, attention_mask=mask, use_cache=False, logps_labels=labels)
        totals.append(sum(saved.values()))
    return (totals[1] - totals[0]) / (rows * seq)


@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("overrides", [[], ["model.dtype=bfloat16"], ["train.mixed_precision=bf16"], ["lora.r=8"],
                                       ["lora.r=8", "lora.dropout=0.1"], ["lora.r=8", "model.dtype=bfloat16"],
                                       ["lora.r=8", "train.mixed_precision=bf16"]], ids=" ".join)
def test_activation_formula_matches_what_autograd_saves(config, overrides):
    cfg = load_config(None, overrides)
    shape = memory.ModelShape.from_config(config)
    p = memory.precision(cfg, None)
    rows, seq = 4, 32
    formula = memory.layer_bytes_per_token(shape, cfg, p, seq, "cpu") + memory.autocast_copies(shape, cfg, p) / (rows * seq)
    # within 0.5%: on CPU LayerNorm keeps bf16 statistics of bf16 inputs, fp32 on CUDA (the formula's)
    assert formula == pytest.approx(saved_bytes_per_block_token(config, overrides, rows, seq), rel=0.005)


def test_cli_exit_codes(capsys):
    assert plan.main(["--config", "configs/default.yaml", "--gpu", "cpu"]) == 0
    assert "fits cpu: yes" in capsys.readouterr().out
    assert plan.main(["--config", MISTRAL, "--gpus", "1", "lora.r=0", "model.dtype=float32"]) == 0
    out = capsys.readouterr().out
    assert "fits h100-80gb: no" in out and "suggestion:" in out
    for argv in (["--config", "configs/default.yaml", "--gpu", "x100"], ["--config", "configs/nope.yaml"],
                 ["--config", "configs/default.yaml", "train.lrr=1"], ["--config", MISTRAL, "--zero", "5"],
                 ["--config", MISTRAL, "--gpus", "0"], ["--config", "configs/default.yaml", "model.path=/nowhere"],
                 ["--sweep", "configs/nope.yaml"]):
        assert plan.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err


def test_command_lines_as_documented():
    script = subprocess.run([sys.executable, "slurm/plan.py", "--sweep", "configs/sweep_mistral7b.yaml"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert script.returncode == 0 and "largest DPO run" in script.stdout, script.stderr
    trainer = run_main(train_dpo.main, "--config", MISTRAL, "--plan", "--gpus", "8")  # the planner's entry point
    assert trainer.returncode == 0 and "fits h100-80gb: yes" in trainer.stdout, trainer.stderr
    bad = run_main(train_dpo.main, "--config", MISTRAL, "--plan", "--gpu", "x100")
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown GPU")


def test_the_planner_knows_which_objectives_need_a_reference():
    """Cached reference: no reference memory in training; reference-free objectives: no precompute job either;
    TR-DPO: a resident copy of the weights (its forward runs before the policy's, so no extra activations)."""
    base = load_config(REPO / "configs" / "gpt2.yaml")
    shape = memory.model_shape(base.model.path)
    cached = memory.estimate(base, 1, gpu="h100-80gb", shape=shape)
    orpo = memory.estimate(load_config(REPO / "configs" / "gpt2.yaml", ["loss.type=orpo"]), 1, shape=shape)
    moving = memory.estimate(load_config(REPO / "configs" / "gpt2.yaml", ["loss.sync_ref_every=8"]), 1, shape=shape)
    assert cached.components["reference"] == orpo.components["reference"] == 0
    weight = memory.precision(base, None).weight
    assert moving.components["reference"] == pytest.approx(shape.parameters() * weight / memory.GIB)
    assert moving.total_gib == pytest.approx(cached.total_gib + moving.components["reference"])
    lines = "\n".join(plan.plan_lines(load_config(REPO / "configs" / "gpt2.yaml", ["loss.type=simpo"])))
    assert "precompute-ref job: none (loss.type is reference-free)" in lines
