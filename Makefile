# The two commands (see README):
#   make demo   set up .venv and the default model, then run the main job on the embedded default
#   make test   set up .venv with test dependencies, then run the whole test suite (what .ci/run calls)
PY := .venv/bin/python

.PHONY: setup demo test
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) train_dpo.py --config configs/default.yaml --dry-run
	$(PY) train_dpo.py --config configs/default.yaml loss.name=sft train.lr=1e-5 output_dir=logs/default/sft
	$(PY) train_dpo.py --config configs/default.yaml model.path=logs/default/sft/final output_dir=logs/default/dpo

test:
	bash scripts/setup.sh --test
	$(PY) -m pytest tests
