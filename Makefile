# LoRA Enclave — set-up, demo and tests. See README.md.
#
# The virtual environment is built from the system's python3.11 (Debian's), not from an
# interpreter in root's home, so that every local user (per-user Jupyter spawns) can run it.
# CPU torch is the default. For a CUDA build (docker/ GPU images):
#   make setup TORCH_SPEC="torch==2.13.0" TORCH_INDEX_URL=<your CUDA wheel mirror>
SYSTEM_PYTHON ?= $(firstword $(wildcard /usr/bin/python3.11) python3.11)
VENV          ?= .venv
PY            := $(VENV)/bin/python
TORCH_SPEC    ?= torch==2.13.0
TORCH_INDEX_URL ?=
LORA_HOME     ?= $(CURDIR)/lora_home
LORA_STATE    ?= $(CURDIR)/lora_state
PYTEST_ARGS   ?=
export LORA_HOME LORA_STATE

.PHONY: setup os-packages demo test lint clean-home help hub

help:
	@echo "make demo   build demo assets, train the demo LoRA, verify its record"
	@echo "make test   lint, then run the test suite"
	@echo "make lint   ruff on lora_kernel, tests and bench; mypy (strict) on common, provenance, trusted, steps"
	@echo "make hub    start the hub on http://127.0.0.1:8000 (demo login; see docs/hub.md)"
	@echo "make setup  (run by both) OS packages (as root), $(VENV) and pinned dependencies"

# OS packages (chromium, nftables, node...): installed when root, else the command is printed.
os-packages:
	@bash .ci/os-packages.sh

$(VENV)/.setup-done: requirements.lock.txt pyproject.toml | os-packages
	@test -x "$(SYSTEM_PYTHON)" || command -v "$(SYSTEM_PYTHON)" >/dev/null || \
	  { echo "python3.11 not found: apt-get install python3.11 python3.11-venv"; exit 1; }
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install --quiet -r requirements.lock.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m lora_kernel install --sys-prefix
	touch $@

hub/node_modules/.installed: hub/package.json hub/package-lock.json | os-packages
	cd hub && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# JupyterLab defaults for every user: widget state saved into notebooks (the studio's choices
# stay in the executed notebook), no news or update checks (air-gapped).
$(VENV)/share/jupyter/lab/settings/overrides.json: hub/lab-overrides.json $(VENV)/.setup-done
	install -D -m 0644 $< $@

setup: os-packages $(VENV)/.setup-done hub/node_modules/.installed $(VENV)/share/jupyter/lab/settings/overrides.json

hub: setup
	$(PY) -m hub.demo

demo: setup
	$(VENV)/bin/lora demo

lint: setup
	$(VENV)/bin/ruff check lora_kernel hub tests bench
	$(VENV)/bin/mypy lora_kernel/common lora_kernel/provenance lora_kernel/trusted lora_kernel/steps

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

clean-home:
	rm -rf "$(LORA_HOME)" "$(LORA_STATE)"
