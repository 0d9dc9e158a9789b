# Two entry points: `make train` (tiny CPU GRPO run) and `make test` (whole suite).
# Both create/update .venv in the repo from requirements.txt and install lwz into it.
PY       ?= python3
VENV     := .venv
VPY      := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
NPROC    ?= 2

.PHONY: setup train test bench clean

$(STAMP): requirements.txt setup.py CMakeLists.txt $(wildcard csrc/*)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) lwz/train.py --config configs/tiny.toml

test: $(STAMP)
	$(VPY) -m pytest -q tests

bench: $(STAMP)
	$(VPY) -m bench

clean:
	rm -rf build *.egg-info lwz/_C*.so
