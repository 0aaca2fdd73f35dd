#!/usr/bin/env bash
# Host discovery for Elastic Horovod (horovodrun --host-discovery-script).
# Prints host:slots for every host in the Open MPI hostfile named by UNET_DISCOVERY_HOSTFILE.
# Horovod runs it every second: edit that hostfile while the job runs to add or remove workers.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${UNET_DISCOVERY_HOSTFILE:?set UNET_DISCOVERY_HOSTFILE to the hostfile to watch}"
exec "$ROOT/.venv/bin/python" -m unet.launch.hostfile --discover "$UNET_DISCOVERY_HOSTFILE"
