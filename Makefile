# Common tasks (each is also a plain command; see README).
.PHONY: setup test test-fast lint format verify run
setup: ; bash scripts/setup.sh --test
test: ; .venv/bin/python -m pytest
test-fast: ; .venv/bin/python -m pytest -m "not slow"
lint: ; .venv/bin/ruff check . && .venv/bin/ruff format --check .
format: ; .venv/bin/ruff format . && .venv/bin/ruff check --fix .
verify: ; .venv/bin/klbench verify --out results/
bench-short: ; .venv/bin/klbench bench --short
run: ; .venv/bin/klbench run
