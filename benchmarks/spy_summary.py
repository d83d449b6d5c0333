"""Summarise ``py-spy record --threads --idle --format raw`` output: where each thread's samples go.

    python benchmarks/spy_summary.py spy.txt [--thread MainThread] [--top 25]

Per thread group (threads named alike are summed): samples, the share idle (the innermost frame is a
wait: epoll/select/lock/recv), then the top frames by self and by inclusive samples of the thread asked for.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

IDLE = re.compile(r"(select|poll|Select|acquire|wait|recv|sleep|accept|_wait_for_tstate_lock|read \(|readinto|_worker \(concurrent)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--thread", default="MainThread")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    groups: collections.Counter[str] = collections.Counter()
    idle: collections.Counter[str] = collections.Counter()
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in open(args.path):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        name = re.sub(r"^thread \(\d+\): ", "", frames[0])
        name = re.sub(r"[_ ]?\d+$", "", name)
        groups[name] += count
        leaf = frames[-1] if len(frames) > 1 else ""
        busy = not (len(frames) == 1 or IDLE.search(leaf))
        if not busy:
            idle[name] += count
        if name == args.thread:
            total += count
            if busy:
                self_c[leaf] += count
                for f in set(frames[1:]):
                    incl[f] += count
    print("| thread | samples | idle % |")
    print("|---|---:|---:|")
    for name, c in groups.most_common():
        print(f"| {name} | {c} | {100 * idle[name] / c:.0f} |")
    busy_total = sum(self_c.values())
    print(f"\n{args.thread}: {total} samples, busy {busy_total} ({100 * busy_total / max(1, total):.0f} %)")
    print("\nself (busy samples):")
    for f, c in self_c.most_common(args.top):
        print(f"  {100 * c / max(1, total):5.1f} %  {f}")
    print("\ninclusive (busy samples):")
    for f, c in incl.most_common(args.top * 2):
        print(f"  {100 * c / max(1, total):5.1f} %  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
