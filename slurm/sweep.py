"""Launch a DPO sweep through submitit: the SFT baseline, the reference log-probs once, then one job array of DPO runs;
with a stage flag, the later stages (answers, judging, the report).

    python slurm/sweep.py --config configs/sweep_default.yaml                   # submit to Slurm
    python slurm/sweep.py --config configs/sweep_tiny.yaml --executor local     # same sweep, local processes
    python slurm/sweep.py --config configs/sweep_tiny.yaml --executor debug     # same sweep, in this process
    python slurm/sweep.py --config configs/sweep_default.yaml --dry-run         # print the plan, submit nothing
    python slurm/sweep.py --config configs/sweep_default.yaml --status          # where every run stands
    python slurm/sweep.py --config configs/sweep_default.yaml --cancel          # cancel the sweep's jobs
    python slurm/sweep.py --config configs/sweep_default.yaml slurm.partition=gpu grid.loss.beta=[0.05,0.1]
    python slurm/sweep.py --config configs/sweep_default.yaml --generate | --judge | --analyze   # the later stages
    python pipeline.py --config configs/sweep_default.yaml                       # every stage, one command

The sweep YAML (slurm/spec.py) names a base training config, overrides for every run, a grid (any training config
key), Slurm resources and the later stages' settings. Runs get readable names from the grid (`beta0.1_seed0`) and
write to <root>/<name>/<run>/; the SFT baseline writes to <root>/<name>/sft/ and the shared reference cache lives
in <root>/<name>/ref_cache/.

Stages (slurm/stages.py), chained with Slurm dependencies (afterok, and dependants are cancelled if a stage fails):
  1. SFT baseline, unless it finished already (same resolved config) or sft.path names a model;
  2. `train_dpo.py --precompute-ref`, once per distinct (reference, data, tokenisation);
  3. the DPO runs as one job array (capped by slurm.array_parallelism).
Every job runs `accelerate launch` (one process per GPU, or launch.cpu_processes on CPU; multi-node through
submitit's srun, one task per node) on a snapshot of the code taken at submission, from resolved config files
written to <root>/<name>/configs/. Jobs are submitit Checkpointables (slurm/jobs.py): on Slurm's pre-timeout
signal (USR2) or a preemption the run saves a checkpoint at the next step boundary, the job requeues itself and
resumes from it.

Running the launcher again submits only what is missing or failed: a run is finished when its run.json says
completed for the same resolved config, or pruned (the sweep's prune: rules stopped it; --retry-pruned trains it
on), and a run whose job is still pending or running is left alone.
With --executor local or debug the launcher runs the stages one after another and waits.
"""
from __future__ import annotations

import argparse
import datetime
import shutil
import sys

import procs
from config import UserInputError
from slurm.launch import launch
from slurm.scheduler import cancel, read_record, scheduler_states, sweep_lock
from slurm.spec import load_sweep
from slurm.stages import TRAINING, Plan, cost_status, print_table, status_table


def say(message: str) -> None:
    print(f"[sweep {datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="sweep YAML, e.g. configs/sweep_default.yaml")
    parser.add_argument("--executor", choices=("slurm", "local", "debug"), default="slurm",
                        help="slurm: sbatch job arrays (default); local: subprocesses here; debug: in this process")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan and submit nothing")
    mode.add_argument("--status", action="store_true", help="print one line per run: job, state, step, eval metrics")
    mode.add_argument("--cancel", action="store_true", help="cancel the sweep's queued and running jobs")
    parser.add_argument("--generate", action="store_true",
                        help="the generation stage: answers from the SFT model and every DPO run (with --dry-run, "
                             "--status: its plan, its table)")
    parser.add_argument("--judge", action="store_true",
                        help="the judging stage: calibration, then every DPO run's answers against SFT's (with "
                             "--dry-run, --status: its plan, its table)")
    parser.add_argument("--analyze", action="store_true",
                        help="the analysis stage: report/<name>/ from the sweep folder once its jobs have ended "
                             "(with --status: whether the report is current)")
    parser.add_argument("--retry-pruned", action="store_true",
                        help="train pruned runs on from their checkpoints (after loosening prune:), instead of "
                             "counting them finished")
    parser.add_argument("overrides", nargs="*", help="sweep overrides: slurm.partition=gpu grid.loss.beta=[0.1,0.3]")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    if args.generate + args.judge + args.analyze > 1:
        parser.error("--generate, --judge and --analyze are separate stages: run one, then the next "
                     "(python pipeline.py runs them all)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    stages = ["generate"] if args.generate else ["judge"] if args.judge else ["analyze"] if args.analyze else \
        list(TRAINING)
    if argv is None:  # the command itself (not a call from another program): it owns its signals
        procs.stop_on_signals()  # SIGTERM/SIGHUP stop local jobs as Ctrl-C does
    grace_s = 60.0
    try:
        plan = Plan(load_sweep(args.config, args.overrides), args.config, retry_pruned=args.retry_pruned)
        grace_s = float(plan.sweep.slurm.signal_delay_s)
        if args.status:
            print_table(*status_table(plan.classify(), stages))
            print(cost_status(plan))
            return 0
        if args.cancel:
            record = read_record(plan.out)
            cancel(record, scheduler_states(record, plan.out), say, grace_s)
            return 0
        if args.executor == "slurm" and not args.dry_run and not shutil.which("sbatch"):
            raise UserInputError("sbatch not found: this is not a Slurm login node. Use --executor local, or start "
                                 "the local cluster: bash slurm/local_cluster.sh up && eval \"$(bash "
                                 "slurm/local_cluster.sh env)\"")
        with sweep_lock(plan.out, shared=args.dry_run):  # plan and submit under one lock: no run submitted twice
            return launch(plan, stages, args.executor, args.dry_run, say)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # local jobs are this command's children (Slurm's are not: they go on)
        say(procs.interrupted(e, grace_s, say) + "; finished results stay on disk. Run the same command again to go on")
        return 130


if __name__ == "__main__":
    sys.exit(main())
