#!/usr/bin/env bash
# The embedded default in one command: install, migrate, start the controller with one local
# worker (SQLite, local object store, no Redis). The default image debian-12 is built by the
# worker on first start (debootstrap, a minute or two); the admin API key file is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
export SCAIGRID_DATA_DIR=${SCAIGRID_DATA_DIR:-$PWD/var}
.venv/bin/scaigrid migrate
exec .venv/bin/scaigrid serve --dev "$@"
