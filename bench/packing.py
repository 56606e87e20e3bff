"""Packing: `data.packing`'s first-fit-decreasing grouping, the scan over every open row (the old path) against the
max-tree search `distune.data.pack_groups` uses, on the same random lengths; then the tree alone on 1M lengths.

    python bench/packing.py          # ~1 min on 2 cores: bench/results/packing.{json,md}

Lengths are uniform in [8, max_length / 2] tokens, rows of max_length = 2048; both paths must give the same rows.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import harness

from distune.data import pack_groups


def scan(lengths: list[int], capacity: int) -> list[list[int]]:
    """The old path: for each sample, longest first, scan the open rows for the first with room (O(N x rows))."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def timed(fn, *args) -> tuple[float, list]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="20000,80000", help="sample counts timed on both paths")
    p.add_argument("--large", type=int, default=1_000_000, help="sample count timed on the tree path alone")
    p.add_argument("--capacity", type=int, default=2048)
    p.add_argument("--out", type=Path, default=harness.ROOT / "bench" / "results" / "packing.json")
    args = p.parse_args(argv)
    rng = random.Random(0)
    rows = []
    for n in [int(x) for x in args.sizes.split(",") if x] + [args.large]:
        lengths = [rng.randint(8, args.capacity // 2) for _ in range(n)]
        tree_s, groups = timed(pack_groups, lengths, args.capacity)
        row = {"samples": n, "rows": len(groups), "fill": sum(lengths) / (len(groups) * args.capacity),
               "tree_s": round(tree_s, 3)}
        if n != args.large:
            scan_s, reference = timed(scan, lengths, args.capacity)
            row |= {"scan_s": round(scan_s, 3), "speed_up": round(scan_s / tree_s, 1), "same_rows": groups == reference}
        rows.append(row)
        print(row, flush=True)
    table = ["| samples | packed rows | fill | scan (old) s | tree s | speed-up | same rows |", "|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        table.append(f"| {r['samples']:,} | {r['rows']:,} | {r['fill']:.3f} | {r.get('scan_s', '-')} | {r['tree_s']} | "
                     f"{r.get('speed_up', '-')} | {r.get('same_rows', '-')} |")
    text = (f"pack_groups on {harness.cpu_name()}, rows of {args.capacity} tokens, lengths uniform in "
            f"[8, {args.capacity // 2}]\n\n" + "\n".join(table))
    print(text)
    harness.write_results(args.out, {"machine": harness.cpu_name(), "capacity": args.capacity, "rows": rows}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
