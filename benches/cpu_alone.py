#!/usr/bin/env python3
"""Which thread runs while a core idles: reads a scheduler trace and reports how much of the
time every core was idle at once, and how much of it one core idled while the other ran a
single thread (and which one). Written for this 2-core machine; cores are read from the trace.

Method (as used for BENCHMARKS.md, "Which thread runs while a core idles"):

    courier serve --config courier.toml &            # note its pid
    courier bench ... -n 150000 -c 64 -s 1024 --backlog --no-baselines --no-wait &
    sleep 1; perf record -e sched:sched_switch -a -o sched.data -- sleep 1
    perf script -F comm,pid,tid,cpu,time,event,trace -i sched.data > sched.txt
    python3 benches/cpu_alone.py sched.txt COURIER_PID

Threads named `tokio-rt-worker` are told apart by process: courier's HTTP workers (the pid
given) and the load tool's.
"""
import collections
import re
import sys

LINE = re.compile(r"\s*(\S.*?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:sched_switch:\s+(.*)")
NEXT = re.compile(r"next_comm=(.*?) next_pid=(\d+)")


def main(path, courier_pid):
    running = {}  # cpu -> tid now on it ("0" is the idle task)
    names, process = {}, {}
    alone = collections.Counter()
    both_idle = 0.0
    first = last = None
    for line in open(path):
        m = LINE.match(line)
        if not m:
            continue
        _, pid, tid, cpu, t, rest = m.groups()
        cpu, t = int(cpu), float(t)
        process[tid] = int(pid)
        if first is None:
            first = t
        if last is not None and len(running) >= 2:
            idle = [c for c, r in running.items() if r == "0"]
            if len(idle) == len(running):
                both_idle += t - last
            elif len(idle) == len(running) - 1:
                busy = next(r for c, r in running.items() if r != "0")
                alone[busy] += t - last
        last = t
        n = NEXT.search(rest)
        running[cpu] = n.group(2)
        names[n.group(2)] = n.group(1)
    span = (last or 0) - (first or 0)
    if span <= 0:
        sys.exit("no sched_switch events in the trace")
    by_name = collections.Counter()
    for tid, secs in alone.items():
        name = names.get(tid, "?")
        if name == "tokio-rt-worker":
            name = "courier HTTP worker" if process.get(tid) == courier_pid else "other tokio worker"
        by_name[name] += secs
    print(f"span {span:.2f} s; every core idle {100 * both_idle / span:.1f}%; "
          f"one core running, the rest idle {100 * sum(alone.values()) / span:.1f}%:")
    for name, secs in by_name.most_common(8):
        print(f"  {name:<22} {100 * secs / span:.1f}%")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: cpu_alone.py SCHED_TRACE.txt COURIER_PID")
    main(sys.argv[1], int(sys.argv[2]))
