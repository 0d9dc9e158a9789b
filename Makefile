# Two entry points: `make train` (the paper's pipeline in miniature on the CPU: tiny CPT, then
# GRPO from the CPT model) and `make test` (whole suite). Both create/update .venv in the repo
# from requirements.txt and install lwz into it.
PY       ?= python3
VENV     := .venv
VPY      := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
NPROC    ?= 2
CPT_DATA := data/cpt
# OVERWRITE=1: start both stages again, moving the previous runs aside (runs/<name>.old-<time>)
TRAIN_FLAGS := $(if $(filter 1,$(OVERWRITE)),--checkpoint.overwrite=true,)

.PHONY: setup train test bench clean

$(STAMP): requirements.txt setup.py CMakeLists.txt $(wildcard csrc/*)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# the synthetic CPT corpus and its token folders: deterministic, remade when the script, the GRPO
# template it copies or the tokenizer changes (the old token folders would not match the new text)
$(CPT_DATA)/.made: scripts/make_cpt_corpus.py configs/grpo-tiny.toml assets/tokenizer/tokenizer.json | $(STAMP)
	rm -rf $(CPT_DATA)/writing $(CPT_DATA)/think $@
	$(VPY) scripts/make_cpt_corpus.py --out $(CPT_DATA)
	$(VPY) -m lwz.data tokenize --in $(CPT_DATA)/writing.jsonl --out $(CPT_DATA)/writing --tokenizer assets/tokenizer
	$(VPY) -m lwz.data tokenize --in $(CPT_DATA)/think.jsonl --out $(CPT_DATA)/think --tokenizer assets/tokenizer
	touch $@

# set-up above, then the timed part: CPT, then GRPO from the CPT model's export
train: $(STAMP) $(CPT_DATA)/.made
	@start=$$(date +%s); \
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) lwz/pretrain.py --config configs/cpt-tiny.toml $(TRAIN_FLAGS) && \
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) lwz/train.py --config configs/grpo-tiny.toml $(TRAIN_FLAGS) && \
	echo "make train: CPT + GRPO took $$(( $$(date +%s) - start )) s"

test: $(STAMP)
	$(VPY) -m pytest -q tests

bench: $(STAMP)
	$(VPY) -m bench

clean:
	rm -rf build *.egg-info lwz/_C*.so
