"""Sweeps on Slurm (or local processes) through submitit.

    spec.py       the sweep file: dataclasses, overrides, run names, each job's resolved config and arguments
    stages.py     the stage protocol: what each stage plans, when it is done, how it is submitted, its --status table
    jobs.py       what runs inside a job: accelerate-launched training, generate.py / judge.py / analyze_sweep.py
    scheduler.py  the sweep record (sweep.json), Slurm and local job states, the launch lock, --cancel
    sweep.py      the command line over them (python slurm/sweep.py --config configs/sweep_default.yaml)
    plan.py       the per-GPU memory planner's command line; memory.py its model of one training process
"""
