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

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/rayapp demo

clean:
	rm -rf $(VENV) runs .pytest_cache
