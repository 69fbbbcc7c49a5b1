"""Run bookkeeping for train_dpo.py: the files a run leaves (config.yaml, run.json, checkpoints/, final/), written
so that a crash, a kill or a full disk loses nothing finished and a re-run resumes.

    out = check_output_dir(cfg, Path(cfg.output_dir))       # completed | failed | ... | None; refuses another config
    save_checkpoint(accelerator, out_dir, step, state, keep)  # atomic: a temporary folder, then one rename
    save_final(cfg, accelerator, model, tokenizer, out_dir)   # final/ in Hugging Face format (+ adapter/ with LoRA)

Every write of a checkpoint or of final/ goes through write_agreed: when the disk (or a quota) is full on any
process, every process stops with the same one-line DiskFullError, the partial folder is removed and the last
complete checkpoint is named, so none waits at a barrier the others have left.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml
from accelerate.utils import broadcast_object_list, gather_object

from config import Config, UserInputError, config_changes, to_yaml
from jsonl import fsync_dir, write_atomic
from models import load_model

REPO = Path(__file__).resolve().parent


class DiskFullError(RuntimeError):
    """A checkpoint or the final model did not fit on the output filesystem; the partial write was removed."""


def launched_as_rank_zero() -> bool:
    """Rank 0 of the launch (or a single process), for output before a process group exists or after it is gone."""
    return int(os.environ.get("RANK", "0")) == 0


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem holding path (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) if Path(folder).is_dir() else 0


def disk_full_reason(error: BaseException, path: Path) -> str | None:
    """Why a write failed, when it failed for lack of space, however the writer reports it: an OSError (ENOSPC or
    EDQUOT), safetensors' SafetensorError ("os error 28"), or torch.save's RuntimeError from its stream writer, which
    names no cause. None for every other error."""
    text = str(error)
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or any(
            s in text for s in ("No space left on device", "os error 28")):
        return "no space left"
    if (isinstance(error, OSError) and error.errno == errno.EDQUOT) or any(
            s in text for s in ("Disk quota exceeded", "os error 122")):
        return "disk quota exceeded"
    if isinstance(error, RuntimeError) and any(s in text for s in ("PytorchStreamWriter", "inline_container")):
        free = free_bytes(path)
        return "no space left" if free is not None and free < 64 * 2**20 else "a write failed (full disk or quota?)"
    return None


def write_agreed(accelerator, tmp: Path, what: str, out_dir: Path, write, every_process: bool = True) -> None:
    """Runs write() (on every process, or on the main one only) and agrees on the outcome: when it failed for lack of
    space on any process, the main process removes the partial folder `tmp` and every process raises the same
    DiskFullError, saying what was being written, how much, what is free, and which checkpoint is kept, so that
    none waits at a barrier the others have left and a re-run resumes. Other errors propagate as they are.
    (DeepSpeed's own checkpoint writer has barriers inside: there a full disk on one rank can still hang the rest.)"""
    failure = None
    if every_process or accelerator.is_main_process:
        try:
            write()
        except Exception as e:
            reason = disk_full_reason(e, tmp)
            if reason is None:
                raise
            failure = f"{reason} on the device holding {out_dir} while writing {what} ({type(e).__name__}: " \
                      f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else e!r})"
    if accelerator.num_processes > 1:
        if every_process:
            failure = next((f for f in gather_object([failure]) if f), None)
        else:
            failure = broadcast_object_list([failure])[0]
    if failure is None:
        return
    message = None
    if accelerator.is_main_process:
        written = folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        kept, free = find_checkpoint(out_dir), free_bytes(out_dir)
        message = (f"{failure}; {gib(written)} had been written, {gib(free or 0)} is free after removing it. "
                   + (f"The last complete checkpoint, {kept}, is kept: free space and run again to resume from it."
                      if kept else "No earlier checkpoint exists: free space and run again."))
    if accelerator.num_processes > 1:
        message = broadcast_object_list([message])[0]  # one message, the same on every process
    raise DiskFullError(message)


# ---------------------------------------------------------------- run records


def check_output_dir(cfg: Config, out_dir: Path) -> str | None:
    """'completed' if this exact config already finished here; refuses a folder used by another config."""
    run_json, saved = out_dir / "run.json", out_dir / "config.yaml"
    partial = incomplete_checkpoint(out_dir) if cfg.train.resume == "auto" else None
    if partial is not None:
        before = find_checkpoint(out_dir)
        what = "an empty checkpoint folder" if not any(partial.iterdir()) else \
            "an incomplete checkpoint (no trainer_state.json, which train_dpo.py writes last)"
        raise UserInputError(f"{partial}: {what}, newer than any complete one: not written by train_dpo.py (its "
                             f"checkpoints appear whole, by one rename), or copied in part. Delete it to resume from "
                             f"{before.name if before else 'the start'}")
    if not run_json.is_file():
        return None
    try:
        info = json.loads(run_json.read_text())
    except (OSError, ValueError) as e:
        raise UserInputError(f"{run_json}: not readable JSON ({e}); it is rewritten whole by each run: delete it to "
                             f"start this output_dir again") from None
    if cfg.train.resume == "never":
        raise UserInputError(f"{out_dir} holds a previous run (run.json); use train.resume=auto or a new output_dir")
    changes = config_changes(yaml.safe_load(saved.read_text()) or {}, cfg) if saved.is_file() else []
    if changes:
        raise UserInputError(f"{out_dir}/config.yaml differs from this run's config ({'; '.join(changes[:4])}); "
                             f"resuming would mix two runs. Use a new output_dir or the same config")
    return info.get("status")


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "peft", "deepspeed", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_record(cfg: Config, out_dir: Path, world_size: int, resumed_from: Path | None, train_pairs: int,
               eval_pairs: int) -> dict:
    """run.json as a run (or a resumed attempt of it) starts: config hash, commit, versions, host, Slurm job, seed."""
    previous = json.loads((out_dir / "run.json").read_text()) if (out_dir / "run.json").is_file() else {}
    return {
        "status": "running", "config_hash": config_hash(cfg), "git_commit": git_commit(), "versions": versions(),
        "host": socket.gethostname(), "seed": cfg.train.seed, "loss": cfg.loss.name,
        "slurm": {k: os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
                                             "SLURM_RESTART_COUNT") if k in os.environ},
        "world_size": world_size, "started": previous.get("started", now()), "attempt_started": now(),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "train_pairs": train_pairs, "eval_pairs": eval_pairs, "max_steps": cfg.train.max_steps,
    }


def write_run_json(out_dir: Path, info: dict) -> None:
    write_atomic(out_dir / "run.json", json.dumps(info, indent=2))


def step_folders(out_dir: Path) -> list[Path]:
    """The run's checkpoints/step-N folders, oldest first."""
    return sorted((p for p in (out_dir / "checkpoints").glob("step-*") if p.name.split("-")[1].isdigit()),
                  key=lambda p: int(p.name.split("-")[1]))


def incomplete_checkpoint(out_dir: Path) -> Path | None:
    """The newest step-N folder when it lacks trainer_state.json (an empty or partly copied folder)."""
    folders = step_folders(out_dir)
    return folders[-1] if folders and not (folders[-1] / "trainer_state.json").is_file() else None


def find_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint: a step-N folder with trainer_state.json (written last, before the rename)."""
    complete = [p for p in step_folders(out_dir) if (p / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


def full_numel(p) -> int:
    """A parameter's full size: under ZeRO-3 it holds only this process's shard and ds_numel is the whole."""
    return getattr(p, "ds_numel", p.numel())


def warn_if_disk_short(model, trainable, keep: int, out_dir: Path, say) -> None:
    """Say at the start, not hours later, when this run's files will not fit in what is free plus what its earlier
    files hold. Its peak: keep + 1 checkpoints (weights and AdamW's two moments) while the newest is written, or keep
    of them and final/ at the end. An estimate (DeepSpeed adds fp32 master weights under bf16)."""
    def size(p):
        return full_numel(p) * p.element_size()
    weights = sum(size(p) for p in model.parameters())
    per_checkpoint = weights + 2 * sum(size(p) for p in trainable)
    need = max((keep + 1) * per_checkpoint, keep * per_checkpoint + weights)
    free = free_bytes(out_dir)
    if free is not None and need > free + folder_bytes(out_dir / "checkpoints") + folder_bytes(out_dir / "final"):
        say(f"warning: this run's files need about {gib(need)} at their peak ({keep + 1} checkpoint(s) of "
            f"{gib(per_checkpoint)} while the newest is written; final/ {gib(weights)}) but {gib(free)} is free on "
            f"the filesystem holding {out_dir}: the run will stop with an error when it fills")


def save_checkpoint(accelerator, out_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Atomic: everything goes to a temporary folder, then one rename makes it visible."""
    final = out_dir / "checkpoints" / f"step-{step:06d}"
    tmp = out_dir / "checkpoints" / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    def write():
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:  # written last and durably: it is what makes a checkpoint complete
            write_atomic(tmp / "trainer_state.json", json.dumps(state, indent=2))
    # every rank writes its own RNG file: write_agreed's collective is also the barrier before the rename
    write_agreed(accelerator, tmp, f"the step-{step} checkpoint", out_dir, write)
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        older = step_folders(out_dir)[:-keep]
        for old in older:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_final(cfg: Config, accelerator, model, tokenizer, out_dir: Path) -> None:
    """final/ in Hugging Face format, in model.dtype (bf16 rounding would erase DPO-sized updates). With LoRA:
    final/adapter/ holds the adapter and final/ the merged model, which vLLM loads directly. Under DeepSpeed the
    weights are those the engine computes with (bf16 with train.mixed_precision=bf16; the fp32 master weights stay in
    checkpoints/, which DeepSpeed's zero_to_fp32.py there turns into a state dict)."""
    final, tmp = out_dir / "final", out_dir / ".tmp-final"
    state_dict = accelerator.get_state_dict(model)  # every process: under ZeRO-3 this gathers the shards to rank 0

    def write():  # the main process only
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped, weights = accelerator.unwrap_model(model), state_dict
        if cfg.lora.r:
            unwrapped.save_pretrained(tmp / "adapter", state_dict=weights)
            unwrapped, weights = merge_lora(cfg, accelerator, unwrapped, tmp / "adapter"), None
        unwrapped.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    write_agreed(accelerator, tmp, "the final model", out_dir, write, every_process=False)
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    accelerator.wait_for_everyone()


def merge_lora(cfg: Config, accelerator, model, adapter_dir: Path):
    """The base model with the adapter merged in. Under ZeRO-3 this process holds only a shard of every base weight,
    so the base is loaded again, whole, on this process alone, and the adapter just saved is merged into it."""
    if not zero3(accelerator):
        return model.merge_and_unload()
    from peft import PeftModel
    from transformers.integrations import unset_hf_deepspeed_config

    # While accelerate's DeepSpeed config is registered, from_pretrained shards the weights at load (zero.Init), a
    # collective that would wait forever for the other processes. (accelerate 1.15's zero3_init_context_manager
    # registers the config again whatever its argument.)
    unset_hf_deepspeed_config()
    try:
        base = load_model(cfg.model.path, cfg.model.dtype)
        return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def parameter_checksum(model) -> float:
    """Sum of every parameter in float64. Under ZeRO-3 each process holds shards: every parameter is gathered in turn
    (a collective, so every process calls this), and the sums agree across processes as they do under DDP."""
    total = 0.0
    for p in model.parameters():
        if hasattr(p, "ds_id"):
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([p])
        else:
            gathered = contextlib.nullcontext()
        with gathered:
            total += float(p.detach().double().sum())
    return total


def zero3(accelerator) -> bool:
    """DeepSpeed ZeRO-3: parameters are sharded across processes from the moment they are loaded (zero.Init)."""
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3
