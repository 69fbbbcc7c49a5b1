# The two commands (see README):
#   make demo   set up .venv and the default model, then run the whole loop on the embedded default with
#               pipeline.py: SFT on SmolLM2-135M + HH, reference log-probs, DPO at three betas, answers from all four
#               models (vLLM), the stand-in judge's calibration on LLMBar and its verdicts against SFT, and the report
#               in report/default/. On the local Slurm cluster when it is up, local processes otherwise; a second
#               run skips every finished stage.
#   make test   set up .venv with test dependencies, then run the whole test suite (what .ci/run calls)
# Between edits: make test-fast (every test without a slow, cluster, vllm or multiprocess marker, no cluster).
PY := .venv/bin/python

.PHONY: setup demo test test-fast
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) pipeline.py --config configs/sweep_default.yaml

# The local Slurm cluster comes up before the tests and goes down after them, pass or fail. Both targets print the
# host's CPU, the test time, and the whole time with setup (and the cluster).
test:
	@start=$$(date +%s); \
	bash scripts/setup.sh --test || exit $$?; \
	trap 'bash slurm/local_cluster.sh down' EXIT; \
	bash slurm/local_cluster.sh up || exit $$?; \
	bash scripts/run_tests.sh all; rc=$$?; \
	echo "[tests] make test: $$(( $$(date +%s) - start )) s in all, setup and the local cluster included"; exit $$rc

test-fast:
	@start=$$(date +%s); \
	bash scripts/setup.sh --test || exit $$?; \
	bash scripts/run_tests.sh fast; rc=$$?; \
	echo "[tests] make test-fast: $$(( $$(date +%s) - start )) s in all, setup included"; exit $$rc
