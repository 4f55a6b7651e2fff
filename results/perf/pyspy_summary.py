"""Summarize a ``py-spy record -f raw`` profile: the share of samples per deepest bdbench frame, and per leaf.

    py-spy record -p PID -d 30 -r 100 -f raw -o profile.txt --nonblocking   # a running sweep, no restart
    python results/perf/pyspy_summary.py profile.txt
"""

import collections
import sys

OWN = ("(bench/", "(attacks/", "(defenses/")


def main(path: str, top: int = 12) -> None:
    own, leaf, total = collections.Counter(), collections.Counter(), 0
    for line in open(path):
        stack, n = line.rsplit(" ", 1)
        frames, n = stack.split(";"), int(n)
        total += n
        own[next((f.strip() for f in reversed(frames) if any(s in f for s in OWN)), "(outside bdbench)")] += n
        leaf[frames[-1].strip()] += n
    for title, counts in (("deepest bdbench frame", own), ("leaf frame", leaf)):
        print(f"by {title}:")
        for frame, n in counts.most_common(top):
            print(f"{n / total:6.1%}  {frame}")


if __name__ == "__main__":
    main(sys.argv[1])
