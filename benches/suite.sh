#!/usr/bin/env bash
# The benchmark scenarios of BENCHMARKS.md, end to end, on this machine:
#   cargo build --release && bash benches/suite.sh
# It starts a release courier on 127.0.0.1:18090 with a fresh data dir under a temporary
# directory, drives it with `courier bench`, and prints the raw results. Everything runs on
# loopback and stops by itself (8 to 17 minutes on a 2-core machine, as fast as it is).
set -u
PORT=18090
. "$(dirname "$0")/common.sh"

start
for i in 1 2 3; do echo "== ingest-only (backlog mode) run $i"; $B -n 50000 -c 64 -s 1024 --backlog --pid "$PID"; done
for i in 1 2 3; do echo "== end-to-end run $i"; $B -n 50000 -c 64 -s 1024 --pid "$PID"; done
for i in 1 2 3; do echo "== latency at 1000/s run $i"; $B -n 20000 -c 64 -s 1024 --rate 1000 --no-baselines --pid "$PID"; done
stop

# 1,000,000 deliveries held back, then drained; RSS sampled every 5 s.
rm -rf data; start
(while kill -0 "$PID" 2>/dev/null; do echo "rss $(date +%s) $(grep VmRSS /proc/$PID/status | awk '{print $2}')"; sleep 5; done > rss.log) &
echo "== backlog 1,000,000"; $B -n 1000000 -c 64 -s 1024 --backlog --no-baselines --pid "$PID" --drain-timeout 900
echo "== 1,000,000 pending with the receiver down"
$B -n 1000000 -c 64 -s 1024 --receiver "http://127.0.0.1:9/down" --no-wait --no-baselines --pid "$PID"
echo "pending: $(curl -s 127.0.0.1:$PORT/metrics | grep -E '^courier_queue_depth' | awk '{s+=$2} END {print s}')"
stop
for run in 1 2 3; do
  t0=$(date +%s.%N); start; echo "graceful restart $run: serving after $(echo "$(date +%s.%N)-$t0" | bc) s"
  sleep 1; kill -9 "$PID"; sleep 0.3
  t0=$(date +%s.%N); start; echo "crash restart $run: serving after $(echo "$(date +%s.%N)-$t0" | bc) s"
  stop
done
echo "db size: $(du -sh data | cut -f1)"
echo "rss samples (KiB): $(awk '{print $3}' rss.log | tr '\n' ' ')"

# kill -9 in the middle of an ingest-only run (deliveries held back, so only the ingest
# journal makes the acknowledged events durable), then restart: time to /readyz and the
# number of journal records re-applied.
for run in 1 2 3; do
  rm -rf data; start
  $B -n 200000 -c 64 -s 1024 --backlog --no-baselines > /dev/null 2>&1 & BP=$!
  sleep 3; kill -9 "$PID"; wait "$BP" 2>/dev/null
  t0=$(date +%s.%N)
  RUST_LOG=info "$BIN" serve --config courier.toml --log-format json > out.log 2> err.log & PID=$!
  until curl -sf "127.0.0.1:$PORT/readyz" > /dev/null; do sleep 0.01; done
  echo "crash mid-ingest restart $run: serving after $(echo "$(date +%s.%N)-$t0" | bc) s;" \
    "journal records re-applied: $(grep -h 're-applied' out.log err.log | grep -o '"records":[0-9]*' | cut -d: -f2)"
  stop
done

# Retention under steady load: 8 rounds of 30,000 events with retention = 5s.
rm -rf data
sed 's/^\[delivery\]/[delivery]\nretention = "5s"/' courier.toml > retention.toml
RUST_LOG=error "$BIN" serve --config retention.toml > out.log 2> err.log & PID=$!
until curl -sf "127.0.0.1:$PORT/readyz" > /dev/null; do sleep 0.01; done
for i in 1 2 3 4 5 6 7 8; do
  $B -n 30000 -c 64 -s 1024 --no-baselines > /dev/null; sleep 3
  echo "retention round $i: file $(du -b data/courier.redb | cut -f1) bytes, purged $(curl -s 127.0.0.1:$PORT/metrics | grep '^courier_retention_purged_total' | awk '{print $2}')"
done
stop
rm -rf "$WORK"
