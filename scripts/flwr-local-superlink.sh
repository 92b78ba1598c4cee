#!/usr/bin/env bash
# Start the local simulation SuperLink that `flwr run .` looks for, the safe way:
# runtime dependency installation disabled (otherwise the SuperLink `uv sync`s the app and
# may pull a CUDA torch build), telemetry off, state under the project-local FLWR_HOME.
# Usage: scripts/flwr-local-superlink.sh [NUM_SITES]   (then: flwr run . --stream ...)
#        scripts/flwr-local-superlink.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" FLWR_HOME="$PWD/.flwr" FLWR_TELEMETRY_ENABLED=0 \
       FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
if [[ "${1:-}" == "stop" ]]; then
    pkill -f "flower-superlink .*--port 39091" || true
    exit 0
fi
sites="${1:-3}"
mkdir -p "$FLWR_HOME/local-superlink"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local"

[superlink.local]
address = ":local:"
options.num-supernodes = $sites
options.backend.client-resources.num-cpus = 1
TOML
if curl -sf 127.0.0.1:39091/health >/dev/null; then
    echo "local SuperLink already running on 127.0.0.1:39091"
    exit 0
fi
nohup flower-superlink --insecure --simulation --isolation subprocess \
    --disable-runtime-dependency-installation \
    --control-api-address 127.0.0.1:39093 --host 127.0.0.1 --port 39091 \
    --database "$FLWR_HOME/local-superlink/state.db" \
    --log-file "$FLWR_HOME/local-superlink/superlink.log" >/dev/null 2>&1 &
for _ in $(seq 1 60); do
    if curl -sf 127.0.0.1:39091/health >/dev/null; then
        echo "local SuperLink up on 127.0.0.1:39091 ($sites simulated sites); logs in $FLWR_HOME/local-superlink/"
        exit 0
    fi
    sleep 1
done
echo "local SuperLink did not come up; see $FLWR_HOME/local-superlink/superlink.log" >&2
exit 1
