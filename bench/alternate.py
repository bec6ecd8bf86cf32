"""make bench's rows for several source trees, runs alternated, medians.

One run of ``bench/bench.py`` per tree is not enough to compare two trees:
the machine drifts between runs by more than the difference sought, and
Postfix's own figures move by tens of per cent. This runs ``bench.py
--source TREE`` for each tree in turn, ROUNDS times (tree A, tree B, tree
A, tree B, ...), with the same arguments, and prints for every row the
median of MailGrave's figure and of the MailGrave/Postfix ratio for each
tree, with the lowest and highest ratio seen: a difference between trees
that is smaller than the spread of one tree is noise.

    .venv/bin/python bench/alternate.py [--rounds 3] TREE... -- [bench.py arguments]

A TREE is a checkout (``git worktree add /work/wt-before COMMIT``); its
``mailgrave`` package is run by this checkout's bench.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    cut = argv.index("--") if "--" in argv else len(argv)
    ours, bench_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tree, alternated")
    parser.add_argument("trees", nargs="+", help="source trees (checkouts) to compare")
    args = parser.parse_args(ours)
    runs: dict[str, list[dict[str, tuple[float, float]]]] = {t: [] for t in args.trees}
    order: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mailgrave-alternate-") as tmp:
        for r in range(args.rounds):
            for i, tree in enumerate(args.trees):
                out = Path(tmp) / f"{r}-{i}.json"
                cmd = [sys.executable, str(HERE / "bench.py"), "--source", tree,
                       "--json", str(out), *bench_args]  # fmt: skip
                print(f"alternate: round {r + 1}, {tree}", file=sys.stderr, flush=True)
                done = subprocess.run(cmd, stdout=subprocess.DEVNULL, check=False)
                if done.returncode != 0:
                    print(f"alternate: bench.py failed for {tree}", file=sys.stderr)
                    return 1
                rows = json.loads(out.read_text())["rows"]
                runs[tree].append({label: (mg, pf) for label, mg, pf, _unit, _hb in rows})
                for label, *_ in rows:
                    if label not in order:
                        order.append(label)
    names = [Path(t).name for t in args.trees]
    print(f"{args.rounds} alternated runs per tree; medians, ratio range in brackets\n")
    print("| row | " + " | ".join(f"{n}: MG | {n}: MG/PF" for n in names) + " |")
    print("| --- |" + " ---: | ---: |" * len(names))
    for label in order:
        cells = []
        for tree in args.trees:
            pairs = [run[label] for run in runs[tree] if label in run]
            ratios = [mg / pf for mg, pf in pairs if pf]
            mg_med = statistics.median(mg for mg, _ in pairs)
            if ratios:
                cells.append(f"{mg_med:.4g} | {statistics.median(ratios):.2f} "
                             f"[{min(ratios):.2f}-{max(ratios):.2f}]")  # fmt: skip
            else:
                cells.append(f"{mg_med:.4g} | -")
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
