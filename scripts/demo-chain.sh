#!/usr/bin/env bash
# A first look: start a demo upstream, relay B and relay A on loopback, send one request through, and print what each
# hop sees (plain at the application, encoded between the relays, plain at the upstream). MTE instead of MKE:
#   bash scripts/demo-chain.sh --encode-type MTE
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m mterelay.demo chain "$@"
