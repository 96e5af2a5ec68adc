# Sourced by the benchmark scripts: a release courier on 127.0.0.1:$PORT (set PORT first)
# with a fresh data dir in a temporary working directory, and the `courier bench` command
# that drives it. Leaves the shell in that directory.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN="$ROOT/target/release/courier"
WORK=$(mktemp -d)
TOKEN=bench-token-0123456789
cat > "$WORK/courier.toml" <<TOML
[server]
listen = "127.0.0.1:$PORT"
data_dir = "data"
[[keys]]
token = "$TOKEN"
scopes = ["ingest", "admin"]
[delivery]
allow_private_networks = true
TOML
cd "$WORK"
start() { RUST_LOG=error "$BIN" serve --config courier.toml > out.log 2> err.log & PID=$!
          until curl -sf "127.0.0.1:$PORT/readyz" > /dev/null; do sleep 0.01; done; }
stop() { kill -TERM "$PID"; while kill -0 "$PID" 2>/dev/null; do sleep 0.02; done; }
# The durable baseline keeps its journal next to the data dir, on the same disk.
B="$BIN bench --url http://127.0.0.1:$PORT --token $TOKEN --durable-dir $WORK"
