"""Print the compact table (and the goals) of a benchmark run from its output folder.

    python -m benchmarks.table OUTDIR [--profile gpu|cpu]

Reads ``OUTDIR/cases.jsonl`` (one line per case, written as each case finishes when the session
runs with ``C2F_BENCH_OUT=OUTDIR``), so it works for a run cut short by a time limit too: the ratios
are recomputed from the cases that were measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import _bench


def load(path: Path) -> tuple[dict[str, _bench.Result], str]:
    """``(results by case, the profile they were run with)``."""
    results: dict[str, _bench.Result] = {}
    profile = "cpu"
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        record.pop("time", None)
        profile = record.pop("profile", None) or profile
        record["ratios"], record["ratios_min"] = {}, {}
        fields = {k: v for k, v in record.items() if k in _bench.Result.__dataclass_fields__}
        results[fields["case"]] = _bench.Result(**fields)  # a later line of a case replaces an earlier one
    return results, profile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--profile", choices=("gpu", "cpu"), default=None,
                        help="whose goals to evaluate (default: the profile the cases were run with)")
    args = parser.parse_args(argv)
    path = args.outdir / "cases.jsonl"
    if not path.is_file():
        print(f"{path}: no cases were measured", file=sys.stderr)
        return 1
    results, profile = load(path)
    _bench.finalise(results)
    print(_bench.table(results, args.profile or profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
