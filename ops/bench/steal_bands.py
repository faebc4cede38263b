#!/usr/bin/env python3
"""Latency by hypervisor steal: reads the logs of `impmesh-bench msg --latency-log FILE`
(FILE: "send_s latency_ms sender" per message; FILE.steal: "t_s steal_cpu0 steal_cpu1 ..."
in 10 ms ticks) and prints, for each band of steal measured over the window in which a
message was sent, how many messages, the share slower than 2 ms, and the p50 and p99.

usage: steal_bands.py [--window SECONDS] FILE...   (docs/benchmarks.md)

/proc/stat counts steal in 10 ms ticks, so a window of W seconds on N CPUs resolves
steal in steps of 1 / (100 * W * N): 5 % for 100 ms on two CPUs.
"""
import bisect
import collections
import sys


def bands(files, window):
    by_band = collections.defaultdict(list)
    for path in files:
        msgs = [tuple(map(float, line.split()[:2])) for line in open(path)]
        steal = [tuple(map(float, line.split())) for line in open(path + ".steal")]
        if not steal:
            continue
        times = [s[0] for s in steal]
        cpus = len(steal[0]) - 1

        def stolen_share(t0, t1):
            i = min(bisect.bisect_left(times, t0), len(steal) - 1)
            j = min(bisect.bisect_left(times, t1), len(steal) - 1)
            ticks = sum(steal[j][k] - steal[i][k] for k in range(1, cpus + 1))
            return ticks / 100.0 / (window * cpus)

        windows = collections.defaultdict(list)
        for sent, latency in msgs:
            windows[int(sent / window)].append(latency)
        for w, latencies in windows.items():
            share = stolen_share(w * window, (w + 1) * window)
            # (a tenth of a share can come out as 0.0999…: ticks are whole numbers)
            by_band[min(int(share * 10 + 1e-9), 4)].extend(latencies)
    return by_band


def main():
    args = sys.argv[1:]
    window = 0.1
    if args[:1] == ["--window"]:
        window = float(args[1])
        args = args[2:]
    if not args:
        sys.exit(__doc__)
    print("| steal in that window | messages | over 2 ms | p50 (ms) | p99 (ms) |")
    print("|---|---|---|---|---|")
    for band, latencies in sorted(bands(args, window).items()):
        latencies.sort()
        n = len(latencies)
        slow = sum(1 for x in latencies if x > 2.0)
        label = f"{band * 10}–{band * 10 + 9} %" if band < 4 else "40 % and more"
        print(f"| {label} | {n:,} | {100 * slow / n:.1f} % | "
              f"{latencies[n // 2]:.2f} | {latencies[int(n * 0.99)]:.2f} |")


if __name__ == "__main__":
    main()
