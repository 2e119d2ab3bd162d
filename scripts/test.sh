#!/usr/bin/env bash
# Install test dependencies, then lint, type-check and run the whole test suite (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
