#!/usr/bin/env bash
# Online backup and restore of a large database (BENCHMARKS.md, "Online backup"):
#   cargo build --release && bash benches/backup.sh [EVENTS]
# A release courier on 127.0.0.1:18091 with a fresh data dir gets EVENTS (default 1,000,000)
# events of 1 KiB queued against a receiver that refuses connections, then `courier backup`
# saves it while courier runs (courier's RSS sampled every 0.2 s meanwhile); courier stops,
# `courier restore` puts the backup in place, courier starts on it, and the delivery counts
# before and after are printed. Loopback only; stops by itself (2 to 4 minutes for 1,000,000
# on a 2-core machine). Put the temporary directory on a disk (TMPDIR) to measure one.
set -eu
PORT=18091
N=${1:-1000000}
. "$(dirname "$0")/common.sh"
export COURIER_URL="http://127.0.0.1:$PORT" COURIER_KEY="$TOKEN"
counts() { "$BIN" stats --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["counts"])'; }

start
$B -n "$N" -c 64 -s 1024 --receiver "http://127.0.0.1:9/down" --no-wait --no-baselines | grep -E 'accepted'
sleep 2
echo "database file: $(stat -c %s data/courier.redb) bytes; courier RSS $(grep VmRSS /proc/$PID/status | awk '{print $2}') KiB"
echo "before: $(counts)"
(peak=0; while [ ! -e backup.done ]; do r=$(grep VmRSS /proc/$PID/status | awk '{print $2}'); [ "$r" -gt "$peak" ] && peak=$r; echo "$peak" > rss.peak; sleep 0.2; done) &
t0=$(date +%s.%N)
"$BIN" backup --out saved.redb
echo "backup: $(echo "$(date +%s.%N)-$t0" | bc) s; courier's peak RSS meanwhile $(cat rss.peak) KiB"
touch backup.done
stop
t0=$(date +%s.%N)
"$BIN" restore --data-dir data saved.redb > /dev/null
echo "restore: $(echo "$(date +%s.%N)-$t0" | bc) s"
t0=$(date +%s.%N); start; echo "serving on the restored database after $(echo "$(date +%s.%N)-$t0" | bc) s"
echo "after: $(counts)"
stop
cd / && rm -rf "$WORK"
