"""Corr2Cause generation time per number of variables: the unlabelled DAGs, the Markov equivalence classes
(d-separation, relabellings, properties) and the rendered items, each stage timed in a fresh cache.

Run: .venv/bin/python benchmarks/corr2cause_generate.py [--nodes 2 3 4 5 6] [--variant plain]
Target: the whole N <= 6 suite (207,432 items) generated in well under a minute. There is no peer to compare
with here: the paper's own generator is a C++ program over all labelled graphs that writes intermediate files.
"""

from __future__ import annotations

import argparse
import time

from decoderlab.suites import corr2cause


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    parser.add_argument("--variant", default="plain", choices=corr2cause.VARIANTS)
    args = parser.parse_args()
    total = 0.0
    print(f"{'N':>2} {'DAGs':>6} {'classes':>8} {'items':>7} {'dags s':>7} {'classes s':>9} {'items s':>8}")
    for n in args.nodes:
        t0 = time.perf_counter()
        dags = corr2cause.unlabeled_dags(n)
        t1 = time.perf_counter()
        classes = corr2cause.equivalence_classes(n)
        t2 = time.perf_counter()
        items = corr2cause.corr2cause_items([n], variant=args.variant)
        t3 = time.perf_counter()
        total += t3 - t0
        count = sum(len(v) for v in items.values())
        print(f"{n:>2} {len(dags):>6} {len(classes):>8} {count:>7} {t1 - t0:>7.2f} {t2 - t1:>9.2f} {t3 - t2:>8.2f}")
    print(f"total {total:.1f} s")


if __name__ == "__main__":
    main()
