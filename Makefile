# Each target creates .venv if it is missing. torch is installed FIRST and pinned, so pip never
# resolves an unpinned torch (which would pull GBs of CUDA wheels). On a GPU machine, override:
#   make test TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
# Reference scorers the reward tests compare with (tests/plugins/reward_refs.py), installed WITHOUT
# their declared requirements (hpsv2 pins pytest==7.2.0, clint and protobuf<4; image-reward pins an
# old timm and fairscale; all three require torchvision); REWARD_REF_DEPS are what they really import.
REWARD_REFS ?= open_clip_torch==3.3.0 timm==1.0.31 hpsv2==1.2.0 image-reward==1.5 fairscale==0.4.13
REWARD_REF_DEPS ?= ftfy pyyaml
# PyPI's torchvision links CUDA libraries the CPU torch lacks; its Python transforms still work for the
# tests, from a folder outside site-packages so that no product import ever sees it.
TORCHVISION_SPEC ?= torchvision==0.28.0

.PHONY: venv test demo bench lint rewards clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# what only the tests need: the reference scorers the reward tests compare with
$(VENV)/.test-refs: $(VENV)/.installed Makefile
	$(PY) -m pip install -q --no-deps $(REWARD_REFS)
	$(PY) -m pip install -q $(REWARD_REF_DEPS)
	rm -rf $(VENV)/torchvision-cpu
	$(PY) -m pip install -q --no-deps --target $(VENV)/torchvision-cpu $(TORCHVISION_SPEC)
	$(PY) tests/plugins/reward_refs.py install-hpsv2-vocab
	touch $@

venv: $(VENV)/.installed

test: venv $(VENV)/.test-refs
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -n auto -q

demo: venv
	$(VENV)/bin/mixgrpo compare experiments/shapes/compare.gin

# make bench BENCH_ARGS="--backbone flux-dev --json flux.json" (real sizes need a GPU; see docs/benchmarks.md)
BENCH_ARGS ?=
bench: venv
	$(PY) benchmarks/iteration_time.py $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

# On a GPU machine: HPS-v2.1's open_clip (it needs a torchvision matching your torch: install both from
# your CUDA index first) and the reward server. CLIP score, PickScore and ImageReward need neither.
rewards: venv
	$(PY) -m pip install -q -e ".[rewards,serve]"

clean:
	rm -rf $(VENV) runs .pytest_cache
