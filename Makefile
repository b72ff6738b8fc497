# One venv for everything: `make demo` runs the main job, `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 / torchvision 0.29.1 is the pair that installs offline here and imports together.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt $(TORCH_PINS)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

.PHONY: install demo test bench
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m monai.bundle run --config_file bundles/dka_brats/train.json

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist worksteal tests

bench: $(VENV)/.installed
	$(PY) benchmarks/run.py
