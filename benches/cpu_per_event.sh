#!/usr/bin/env bash
# Where each ingested event's CPU goes: courier's threads, the load tool, and the bare server.
#   cargo build --release && bash benches/cpu_per_event.sh [EVENTS]
#
# Method (BENCHMARKS.md, "The CPU budget of one event"): a release courier on 127.0.0.1:18091
# with a fresh data dir; 20,000 events warm it up; then `courier bench` sends EVENTS more
# (default 100,000; 64 producers, 1 KiB, deliveries held back, no baselines, no waiting for
# deliveries) while this script reads every courier thread's CPU time from /proc before and
# after, and the load tool's own CPU time from its exit. The idle share is the machine's
# (/proc/stat). Then a second `courier bench` with its baselines and `--pid` runs against the
# same courier and reports the same figures itself, with the CPU the bare server process it
# starts (`courier bench-server`) spent per request: what HTTP alone costs a server process
# here. Everything stays on loopback and stops by itself.
set -u
N=${1:-100000}
PORT=18091
. "$(dirname "$0")/common.sh"
start
B="$B -c 64 -s 1024 --backlog"
TICK=$(getconf CLK_TCK)

# Per thread name: CPU ticks (user + system) summed over courier's threads.
threads() {
  for t in /proc/$PID/task/*; do
    echo "$(cat "$t/comm" | tr ' ' '_') $(awk '{print $14 + $15}' "$t/stat")"
  done | awk '{c[$1] += $2} END {for (k in c) print k, c[k]}' | sort
}
idle_total() { head -1 /proc/stat | awk '{t = 0; for (i = 2; i <= NF; i++) t += $i; print $5 + $6, t}'; }

$B -n 20000 --no-baselines > /dev/null 2>&1
threads > before.txt; read -r i0 t0 < <(idle_total)
/usr/bin/time -f "%U %S" -o tool.txt $B -n "$N" --no-baselines --no-wait > run.txt 2>&1
threads > after.txt; read -r i1 t1 < <(idle_total)
grep -i "accepted" run.txt
echo "CPU per event, µs (over $N events):"
join before.txt after.txt | awk -v n="$N" -v hz="$TICK" \
  '{us = ($3 - $2) * 1e6 / hz / n; if (us >= 0.05) printf "  courier %-16s %6.1f\n", $1, us; s += us} END {printf "  courier total            %6.1f\n", s}'
awk -v n="$N" '{printf "  courier bench (the tool) %6.1f\n", ($1 + $2) * 1e6 / n}' tool.txt
awk -v a="$i0" -v b="$i1" -v c="$t0" -v d="$t1" 'BEGIN {printf "  cores idle               %5.1f%%\n", 100 * (b - a) / (d - c)}'

# The same run as the tool measures it (`--pid`): courier's CPU per event until the database
# holds every event, the tool's own, and the bare server process's per request answered.
$B -n "$N" --pid "$PID" --json > base.json 2> /dev/null
python3 -c "
import json; d = json.load(open('base.json'))
print('as courier bench --pid reports it, in a second run of %d:' % d['events'])
print('  courier                  %6.1f' % d['courier_cpu_us_per_event'])
for name, us in sorted(d['courier_cpu_by_thread_us_per_event'].items(), key=lambda x: -x[1]):
    print('    %-22s %6.1f' % (name, us))
print('  courier bench (the tool) %6.1f' % d['tool_cpu_us_per_event'])
print('  bare server process      %6.1f per request' % d['baseline_202_process_cpu_us_per_request'])
print('  (courier %.0f events/s; bare server %.0f req/s in the tool, %.0f in its own process)' % (
    d['accepted_per_sec'], d['baseline_202_per_sec'], d['baseline_202_process_per_sec']))"
stop
rm -rf "$WORK"
