# The two commands (see README):
#   make demo   set up .venv and the default model, then run the embedded default sweep (SFT + 3 DPO runs, local)
#               answer the held-out and MT-Bench prompts with all four models (vLLM), then judge each DPO run
#               against SFT (SmolLM2 as a stand-in judge) with the judge's calibration on LLMBar and held-out HH,
#               then write the report (figures, tables) to report/default/
#   make test   set up .venv with test dependencies, then run the whole test suite (what .ci/run calls)
PY := .venv/bin/python

.PHONY: setup demo test
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) train_dpo.py --config configs/default.yaml --dry-run
	$(PY) slurm/sweep.py --config configs/sweep_default.yaml --executor local
	$(PY) slurm/sweep.py --config configs/sweep_default.yaml --status
	$(PY) slurm/sweep.py --config configs/sweep_default.yaml --executor local --generate
	$(PY) slurm/sweep.py --config configs/sweep_default.yaml --generate --status
	$(PY) slurm/sweep.py --config configs/sweep_default.yaml --executor local --judge
	$(PY) slurm/sweep.py --config configs/sweep_default.yaml --judge --status
	$(PY) analyze_sweep.py --sweep logs/default

# The local Slurm cluster comes up before the tests and goes down after them, pass or fail.
test:
	bash scripts/setup.sh --test
	trap 'bash slurm/local_cluster.sh down' EXIT; bash slurm/local_cluster.sh up && $(PY) -m pytest tests
