# Each target creates .venv if it is missing. torch is installed FIRST and pinned, so pip never
# resolves an unpinned torch (which would pull GBs of CUDA wheels). On a GPU machine, override:
#   make test TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1

.PHONY: venv test demo bench lint rewards clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -n auto -q

demo: venv
	$(VENV)/bin/mixgrpo compare experiments/shapes/compare.gin

bench: venv
	$(PY) benchmarks/iteration_time.py

lint: venv
	$(VENV)/bin/ruff check .

# hpsv2 1.2.0 declares pytest==7.2.0, clint and protobuf<4 as runtime needs and image-reward pins an
# old timm: install both without their declared pins; their real needs come from the `rewards` extra.
# (open_clip needs torchvision, which has no CPU wheel beside torch 2.13 here: use a GPU machine.)
rewards: venv
	$(PY) -m pip install -q -e ".[rewards]"
	$(PY) -m pip install -q --no-deps hpsv2 image-reward

clean:
	rm -rf $(VENV) runs .pytest_cache
