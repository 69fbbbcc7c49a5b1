# The two commands (see README):
#   make demo   set up .venv and the default model, then run the whole loop on the embedded default with
#               pipeline.py: SFT on SmolLM2-135M + HH, reference log-probs, DPO at three betas, answers from all four
#               models (vLLM), the stand-in judge's calibration on LLMBar and its verdicts against SFT, and the report
#               in report/default/. On the local Slurm cluster when it is up, local processes otherwise; a second
#               run skips every finished stage.
#   make test   set up .venv with test dependencies, then run the whole test suite (what .ci/run calls)
PY := .venv/bin/python

.PHONY: setup demo test
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) pipeline.py --config configs/sweep_default.yaml

# The local Slurm cluster comes up before the tests and goes down after them, pass or fail.
test:
	bash scripts/setup.sh --test
	trap 'bash slurm/local_cluster.sh down' EXIT; bash slurm/local_cluster.sh up && $(PY) -m pytest tests
