# `make test` and `make demo` set everything up themselves: a .venv with the CPU build of
# torch 2.13.0 installed first, then rayapp pinned against it by constraints.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Ray/HF flags for one machine without the hub, defined once in rayapp/env.py (stdlib only,
# so it is read before the venv exists); values already in the environment win.
ENV_FLAGS := $(shell $(PY) rayapp/env.py local)
$(foreach kv,$(ENV_FLAGS),$(eval $(subst =, ?= ,$(kv))))
export $(foreach kv,$(ENV_FLAGS),$(firstword $(subst =, ,$(kv))))

# the venv's tools first, for every process a target starts (Ray workers, local nodes): DeepSpeed's
# op build below and its later loads must see the same `ninja` (the venv's pip one); a system
# ninja of another version reads the build log as stale and recompiles the op inside a test
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install test bench-smoke demo clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
# DeepSpeed JIT-compiles its CPU shared-memory allreduce op in the first DeepSpeed-on-CPU run of
# a machine (gcc, 37-52 s on 2 cores, inside that run's workers); build it once here instead,
# with the call DeepSpeed makes (it skips the op where the CPU lacks it), into
# ~/.cache/torch_extensions, where every later run loads it
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

# two workers (pytest-xdist), each with its own Ray cluster: one process left a core idle a
# quarter of the time; modules are dealt out longest first, in conftest's order (hence
# --no-loadscope-reorder); the benchmarks below run alone, as they time things
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --ignore=tests/test_benchmarks.py

# every benchmark's --smoke run (tests/test_benchmarks.py): CI runs it after `make test`
bench-smoke: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_benchmarks.py

demo: $(STAMP)
	$(BIN)/rayapp demo

clean:
	rm -rf $(VENV) runs .pytest_cache
