"""Per-GPU memory planner: what one training process of train_dpo.py holds, whether it fits a GPU, and what would.

    python slurm/plan.py --config configs/mistral7b.yaml --gpu h100-80gb --gpus 8 --zero 2
    python slurm/plan.py --config configs/mistral7b.yaml --gpu h100-80gb --gpus 1 --zero 0 lora.r=0 model.dtype=float32
    python slurm/plan.py --config configs/mistral7b.yaml --deepspeed-config configs/accelerate/zero2.json --gpus 8
    python slurm/plan.py --config configs/gpt2.yaml --gpu a10g --reference model     # with TRL's resident reference
    python slurm/plan.py --sweep configs/sweep_mistral7b.yaml [--gpu h200] [slurm.gpus_per_node=4 ...]
    python slurm/plan.py --config configs/default.yaml --gpu cpu                     # bench/bench_memory.py checks this
    python train_dpo.py --config configs/mistral7b.yaml --plan [--gpu h100-80gb --gpus 8]

--gpus is GPUs per node (one training process each), --nodes multiplies it into the data-parallel world size; --zero 0
means no DeepSpeed (one process, or DDP). A sweep file gives all of these itself: slurm.gpus_per_node x slurm.nodes,
launch.deepspeed_config (zero_optimization.stage and offload_* from the JSON), and its base config plus overrides.

The estimate follows what train_dpo.py does, not a generic trainer: reference log-probs are cached on disk (no
reference model during training), log-probs come from add_logps_head (the [rows, length, vocab] logits never exist,
1,024 label tokens go through the LM head at a time), a micro-batch is chosen + rejected = 2 x train.batch_size rows
padded to at most tokenize.max_length, bf16 is autocast over model.dtype weights, LoRA adapters are fp32 unless
DeepSpeed casts them, AdamW holds two states per trainable parameter. Printed in GiB (2^30 bytes).
Exit status 0 when a plan is printed, fitting or not (read its `fits` line); 2 for bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from config import Config, UserInputError, load_config
from objectives import needs_reference
from slurm.spec import load_sweep, training_jobs, value_text
from slurm.memory import (GIB, GPUS, DeepSpeed, Estimate, Gpu, ModelShape, count_text, deepspeed_for, estimate, fits,
                          get_gpu, model_shape, precision, reference_job, verdict)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- what would fit


# Rough step-time factors, multiplied together, to rank settings that use as many GPUs. From the papers, not
# measured here: recomputation costs about one more forward, +1/3 of forward + backward (Chen et al. 2016;
# Korthikanti et al. 2022 §5 measure 36-39%); ZeRO-1/2 move as many bytes as DDP's all-reduce, ZeRO-3 1.5x as many
# (Rajbhandari et al. 2020 §7); ZeRO-Offload runs Adam on the CPU and crosses PCIe every step (Ren et al. 2021),
# parameter offload every forward and backward; a halved micro-batch gives each kernel less work; nodes talk slower.
SLOWDOWN = {"gradient_checkpointing": 1.33, "zero1": 1.0, "zero2": 1.02, "zero3": 1.15, "offload_optimizer": 1.5,
            "offload_param": 2.5, "halve_micro_batch": 1.08, "multi_node": 1.1}


@dataclass
class Suggestion:
    config: Config
    overrides: list[str]
    """What changes in the training config, as key=value overrides."""
    gpus_per_node: int
    nodes: int
    deepspeed: DeepSpeed | None
    estimate: Estimate
    slowdown: float
    changes_experiment: bool
    """LoRA instead of full fine-tuning: a different experiment, offered only when nothing else fits."""

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


def _settings(cfg: Config, gpus_per_node: int, nodes: int, ds: DeepSpeed | None, max_nodes: int):
    """Every (config, overrides, GPUs per node, nodes, DeepSpeed, slowdown, LoRA?) worth trying, keeping the global
    batch (train.batch_size x GPUs x train.grad_accum) of the config."""
    global_batch = cfg.train.batch_size * gpus_per_node * nodes * cfg.train.grad_accum
    stage0 = ds.stage if ds else 0
    layouts = {(g, 1) for g in (gpus_per_node, 2, 4, 8) if g >= gpus_per_node} | {(gpus_per_node, nodes)}
    layouts |= {(max(gpus_per_node, 8), m) for m in (2, 4, 8, 16) if nodes <= m <= max_nodes}
    micro_batches = sorted({cfg.train.batch_size >> k for k in range(8)} - {0}, reverse=True)
    for lora, checkpointing, stage, offload, (g, m), b in itertools.product(
            [False] + ([True] if not cfg.lora.r else []), sorted({cfg.train.gradient_checkpointing, True}),
            range(stage0, 4), ("none", "optimizer", "param"), sorted(layouts), micro_batches):
        accum, rest = divmod(global_batch, b * g * m)
        if rest or accum < 1 or (offload == "optimizer" and not stage) or (offload == "param" and stage != 3):
            continue
        add_checkpointing = checkpointing and not cfg.train.gradient_checkpointing
        overrides = ["train.gradient_checkpointing=true"] if add_checkpointing else []
        if (b, accum) != (cfg.train.batch_size, cfg.train.grad_accum):
            overrides += [f"train.batch_size={b}", f"train.grad_accum={accum}"]
        overrides += ["lora.r=16"] if lora else []
        new = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, batch_size=b, grad_accum=accum, gradient_checkpointing=checkpointing),
            lora=dataclasses.replace(cfg.lora, r=16) if lora else cfg.lora)
        deepspeed = ds if (stage, offload) == (stage0, "none") else dataclasses.replace(
            ds or DeepSpeed(stage), stage=stage, offload_optimizer=offload != "none", offload_param=offload == "param")
        slowdown = math.prod([SLOWDOWN["gradient_checkpointing"] if add_checkpointing else 1.0,
                              SLOWDOWN.get(f"zero{stage}", 1.0), SLOWDOWN.get(f"offload_{offload}", 1.0),
                              SLOWDOWN["multi_node"] if m > 1 else 1.0,
                              SLOWDOWN["halve_micro_batch"] ** math.log2(cfg.train.batch_size / b)])
        yield new, overrides, g, m, deepspeed, slowdown, lora


def suggest(cfg: Config, gpu: str | Gpu = "h100-80gb", gpus_per_node: int = 1, nodes: int = 1,
            deepspeed: DeepSpeed | None = None, reference: str = "cached", shape: ModelShape | None = None,
            max_nodes: int = 16) -> Suggestion | None:
    """The cheapest setting that fits: fewest GPUs, then the smallest slowdown; LoRA only when nothing else fits."""
    gpu = gpu if isinstance(gpu, Gpu) else get_gpu(gpu)
    shape = shape or model_shape(cfg.model.path)
    best = None
    for new, overrides, g, m, ds, slowdown, lora in _settings(cfg, gpus_per_node, nodes, deepspeed, max_nodes):
        if best is not None and (lora, g * m, slowdown) >= (best.changes_experiment, best.gpus, best.slowdown):
            continue
        est = estimate(new, g * m, gpu=gpu, deepspeed=ds, reference=reference, shape=shape)
        if fits(est):
            best = Suggestion(new, overrides, g, m, ds if ds and ds.stage else None, est, slowdown, lora)
    return best


# ---------------------------------------------------------------- printing


def setup_text(gpus_per_node: int, nodes: int, ds: DeepSpeed | None, gpu: Gpu) -> str:
    where = f"{gpus_per_node} x {gpu.name}" + (f" x {nodes} nodes" if nodes > 1 else "")
    if ds is None or not ds.stage:
        how = "DDP" if gpus_per_node * nodes > 1 else "no DeepSpeed"
    else:
        how = f"DeepSpeed ZeRO-{ds.stage}" + (" + optimizer offload" if ds.offload_optimizer else "") + (
            " + parameter offload" if ds.offload_param else "")
    return f"{where} ({gpu.memory_gib:.1f} GiB each), {how}"


def table_lines(est: Estimate) -> list[str]:
    lines = [f"  {'component':20}{'GiB':>8}  why"]
    lines += [f"  {name:20}{gib:8.2f}  {est.why[name]}" for name, gib in est.components.items()]
    phase = max(est.phases, key=est.phases.get)
    lines.append(f"  {'peak':20}{est.total_gib:8.2f}  weights + optimizer state + buffers + reference + overhead + "
                 f"the largest phase, {phase} (" + ", ".join(f"{k} {v:.2f}" for k, v in est.phases.items()) + ")")
    return lines


def verdict_line(est: Estimate) -> str:
    tight = fits(est) and est.headroom_gib < 0.05 * est.gpu.memory_gib
    return (f"fits {est.gpu.name}: {verdict(est)}, {est.total_gib:.1f} of {est.gpu.memory_gib:.1f} GiB (headroom "
            f"{est.headroom_gib:+.1f} GiB)" + ("; tight: under 5% left for fragmentation" if tight else ""))


def suggestion_lines(s: Suggestion | None, config_file: str = "", sweep: bool = False) -> list[str]:
    if s is None:
        return ["suggestion: nothing up to 16 nodes x 8 GPUs fits; lower tokenize.max_length"]
    ds = s.deepspeed
    lines = [f"suggestion: {setup_text(s.gpus_per_node, s.nodes, ds, s.estimate.gpu)}"
             + (f"; {' '.join(s.overrides)}" if s.overrides else "")
             + f" -> {s.estimate.total_gib:.1f} GiB, ~{s.slowdown:.2f}x step time"
             + (f", {12 * s.estimate.trainable / s.gpus / GIB:.0f} GiB of host RAM per process for the offloaded "
                f"optimizer" if ds and ds.offload_optimizer else "")
             + ("; CHANGES THE EXPERIMENT (LoRA, not full fine-tuning): nothing else fits" if s.changes_experiment
                else "")]
    zero_json = ""
    if ds:
        zero_json = f"configs/accelerate/zero{ds.stage}" + ("_offload" if ds.offload_optimizer else "") + ".json"
    if sweep:
        settings = [f"slurm.gpus_per_node={s.gpus_per_node}", f"slurm.nodes={s.nodes}"]
        settings += [f"launch.deepspeed_config={zero_json}"] if ds else []
        lines.append("  sweep settings: " + " ".join(settings + [f"overrides.{o}" for o in s.overrides]))
    else:
        launch = (f"accelerate launch --num_processes {s.gpus} --num_machines {s.nodes} --mixed_precision "
                  f"{'bf16' if s.config.train.mixed_precision == 'auto' else s.config.train.mixed_precision}")
        if ds:
            launch += f" --use_deepspeed --zero_stage {ds.stage}" + (
                " --offload_optimizer_device cpu" if ds.offload_optimizer else "") + (
                " --offload_param_device cpu" if ds.offload_param else "")
        path, *given = (config_file or "<config>").split()
        merged = {o.split("=", 1)[0]: o for o in given + s.overrides}  # a suggested key replaces the one given
        lines.append(f"  run: {launch} train_dpo.py --config {path} {' '.join(merged.values())}".rstrip())
    if zero_json and not (REPO / zero_json).is_file():
        offload = (', "offload_optimizer": {"device": "cpu"}' if ds.offload_optimizer else "") + (
            ', "offload_param": {"device": "cpu"}' if ds.offload_param else "")
        base = next((f for f in (f"configs/accelerate/zero{ds.stage}.json", "configs/accelerate/zero2.json")
                     if (REPO / f).is_file()), "a DeepSpeed JSON")
        lines.append(f"  ({zero_json} is not in the repo: {base} with "
                     f'"zero_optimization": {{"stage": {ds.stage}{offload}}})')
    return lines


def plan_lines(cfg: Config, gpu: str | Gpu = "h100-80gb", gpus: int = 1, nodes: int = 1, zero_stage: int = 0,
               deepspeed: DeepSpeed | None = None, reference: str = "cached", config_file: str = "",
               with_suggestion: bool = True) -> list[str]:
    """The plan for one training config: model, micro-batch, the component table, the verdict, and what would fit."""
    gpu = gpu if isinstance(gpu, Gpu) else get_gpu(gpu)
    ds = deepspeed if deepspeed is not None else deepspeed_for(zero_stage)
    ds = ds if ds is not None and ds.stage else None
    shape = model_shape(cfg.model.path)
    est = estimate(cfg, gpus * nodes, gpu=gpu, deepspeed=ds, reference=reference, shape=shape)
    p = precision(cfg, ds)
    rows = 2 * cfg.train.batch_size if cfg.loss.name == "dpo" else cfg.train.batch_size
    lines = [
        f"plan: {config_file or cfg.model.path} on {setup_text(gpus, nodes, ds, gpu)}",
        f"model: {cfg.model.path} ({shape.family}, {shape.layers} x {shape.hidden}, vocab {shape.vocab}): "
        f"{count_text(est.parameters)} params, {count_text(est.trainable)} trained"
        + (f" (LoRA r={cfg.lora.r})" if cfg.lora.r else " (full fine-tuning)")
        + f"; weights {p.weight} B, compute {'bf16' if p.compute == 2 else 'fp32'}",
        f"micro-batch: {cfg.train.batch_size} pairs = {rows} rows x {cfg.tokenize.max_length} tokens, grad_accum "
        f"{cfg.train.grad_accum}, gradient checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'}",
        *table_lines(est),
        *[f"note: {n}" for n in est.notes],
        verdict_line(est),
        f"precompute-ref job: {reference_job(cfg, gpus * nodes, gpu, ds, shape):.1f} GiB per process"
        if cfg.loss.name == "dpo" and needs_reference(cfg.loss.types) else
        f"precompute-ref job: none (loss.{'name sft' if cfg.loss.name == 'sft' else 'type is reference-free'})",
    ]
    if with_suggestion and not fits(est):
        lines += suggestion_lines(suggest(cfg, gpu, gpus, nodes, ds, reference, shape), config_file)
    return lines


def plan_sweep(sweep_file: str, overrides=(), gpu: str | None = None) -> list[str]:
    """The plan of every job of a sweep (SFT, reference, DPO runs) on what its slurm and launch sections ask for,
    with the table of the DPO run that needs the most memory and, if it does not fit, what would."""
    sw = load_sweep(sweep_file, list(overrides))
    jobs = training_jobs(sw, sweep_file)
    # the DPO runs start from the SFT model, which does not exist yet: it has the base model's architecture
    base = load_config(sw.base, [f"{k}={value_text(v)}" for k, v in sw.overrides.items()])
    shape = model_shape(sw.sft.path or base.model.path)
    ds = None
    if sw.launch.deepspeed_config:
        path = Path(sw.launch.deepspeed_config)
        ds = DeepSpeed.from_json(path if path.is_file() or path.is_absolute() else REPO / path)
    lines = [f"sweep {sw.name} ({sweep_file}): base {sw.base}, {sum(j.kind == 'dpo' for j in jobs)} DPO run(s)"]
    if gpu is None and sw.slurm.gpus_per_node:
        lines.append("GPU: h100-80gb assumed (--gpu NAME for another)")
    worst = None
    for job in jobs:
        res = sw.resources(job.kind)
        per_node = res.gpus_per_node or sw.launch.cpu_processes
        if gpu:
            device = get_gpu(gpu)
        elif res.gpus_per_node:
            device = get_gpu("h100-80gb")
        else:  # a CPU job: its share of the node's --mem
            device = Gpu("cpu", res.mem_gb * 1e9 / GIB / per_node, "cpu")
        world = per_node * res.nodes
        if job.kind == "reference":
            total = reference_job(job.config, world, device, ds, shape)
            ok = total <= device.memory_gib
        else:
            est = estimate(job.config, world, gpu=device, deepspeed=ds, shape=shape)
            total, ok = est.total_gib, fits(est)
            if job.kind == "dpo" and (worst is None or total > worst[1].total_gib):
                worst = (job, est, per_node, res.nodes)
        lines.append(f"  {job.kind:9} {job.key:22} {total:7.1f} GiB per process, {per_node} x {device.name}"
                     + (f" x {res.nodes} nodes" if res.nodes > 1 else "") + f" ({device.memory_gib:.1f} GiB): "
                     f"fits {'yes' if ok else 'no'}")
    if worst is not None:
        job, est, per_node, n_nodes = worst
        lines.append(f"largest DPO run, {job.key}: {setup_text(per_node, n_nodes, ds, est.gpu)}")
        lines += table_lines(est) + [f"note: {n}" for n in est.notes] + [verdict_line(est)]
        if not fits(est):
            lines += suggestion_lines(suggest(job.config, est.gpu, per_node, n_nodes, ds, shape=shape), sweep=True)
    return lines


# ---------------------------------------------------------------- command line


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", default=None, help=f"one of {', '.join([*GPUS, 'cpu'])} (default h100-80gb)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs (training processes) per node (default 1)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="training config, e.g. configs/mistral7b.yaml")
    what.add_argument("--sweep", help="sweep file, e.g. configs/sweep_mistral7b.yaml (its slurm and launch sections)")
    add_device_arguments(parser)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--zero", type=int, default=0, help="DeepSpeed ZeRO stage; 0 = no DeepSpeed (default)")
    parser.add_argument("--deepspeed-config", help="a DeepSpeed JSON; its stage and offload settings win over --zero")
    parser.add_argument("--offload-optimizer", action="store_true", help="ZeRO-Offload: optimizer state in host RAM")
    parser.add_argument("--offload-param", action="store_true", help="ZeRO-3: parameters in host RAM")
    parser.add_argument("--reference", default="cached", choices=("cached", "model"),
                        help="cached: what train_dpo.py does (default); model: a resident reference copy (TRL's)")
    parser.add_argument("overrides", nargs="*", help="training overrides (--config) or sweep overrides (--sweep)")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.sweep:
            print("\n".join(plan_sweep(args.sweep, args.overrides, args.gpu)))
            return 0
        if args.gpus < 1 or args.nodes < 1:
            raise UserInputError("--gpus and --nodes: must be at least 1")
        cfg = load_config(args.config, args.overrides)
        ds = DeepSpeed.from_json(args.deepspeed_config) if args.deepspeed_config else deepspeed_for(
            args.zero, args.offload_optimizer, args.offload_param)
        print("\n".join(plan_lines(cfg, args.gpu or "h100-80gb", args.gpus, args.nodes, deepspeed=ds,
                                   reference=args.reference, config_file=" ".join([args.config, *args.overrides]))))
        return 0
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
