"""Merge `goat compare` reports run in pieces into one report (report.json, report.md, compare.png, rates.png).

    python scripts/merge_comparisons.py OUT PIECE/report.json[:LABEL,LABEL...] ...

Each piece is a finished comparison over some of the rows; `:LABELS` keeps only those rows of a piece.
The pieces must agree on what makes runs comparable seed by seed (task, data, model, sizes, epochs,
seeds, metric); the merged report then picks each seed's rate on validation and pairs seeds exactly as
one `goat compare` over all the rows would. A row that a later piece also has is taken from the later
piece (said on stdout and in the report's `pieces`): a params-budget piece of LoRA and rsLoRA after a
rank-budget comparison gives the params comparison. With one piece and no labels the report is written
again as it was (for example to add a plot made by a newer version).
"""

from __future__ import annotations

import json
import os
import sys

from goat_lora.report import write_compare_report

# what two pieces must share for their seed-s runs to be the same experiment on the same data
SAME = ("task", "data", "model", "quantize", "seeds", "epochs", "select", "metric", "lower_is_better")
SAME_GIVEN = ("train_size", "validation_size", "test_size", "max_length", "image_size", "batch_size", "r")


def read_piece(argument: str) -> tuple[str, dict, list[str] | None]:
    path, _, labels = argument.partition(":")
    with open(path, encoding="utf-8") as fh:
        return path, json.load(fh), labels.split(",") if labels else None


def merge(pieces: list[tuple[str, dict, list[str] | None]]) -> tuple[list[dict], dict, dict | None]:
    first = pieces[0][1]["settings"]
    runs, rows, lr_grid, ranks, sources = [], [], {}, {}, []
    for path, piece, labels in pieces:
        settings = piece["settings"]
        for key in SAME:
            if settings.get(key) != first.get(key):
                raise SystemExit(f"{path}: {key} is {settings.get(key)!r}, the first piece's {first.get(key)!r}")
        for key in SAME_GIVEN:
            mine, theirs = settings.get("given", {}).get(key), first.get("given", {}).get(key)
            if mine != theirs:
                raise SystemExit(f"{path}: --{key.replace('_', '-')} is {mine!r}, the first piece's {theirs!r}")
        kept = labels or list(piece["methods"])
        missing = [label for label in kept if label not in piece["methods"]]
        if missing:
            raise SystemExit(f"{path}: no row {', '.join(missing)}; it has {', '.join(piece['methods'])}")
        for label in (label for label in kept if label in rows):  # keeps its place in the table
            print(f"{path}: row {label} replaces the earlier piece's")
            runs = [r for r in runs if r.get("label", r["method"]) != label]
            for source in sources:
                source["rows"] = [row for row in source["rows"] if row != label]
        rows += [label for label in kept if label not in rows]
        runs += [r for r in piece["runs"] if r.get("label", r["method"]) in kept]
        lr_grid.update({label: settings.get("lr_grid", {}).get(label) for label in kept})
        ranks.update({label: settings.get("ranks", {}).get(label) for label in kept})
        sources.append({"report": path, "rows": kept, "command": settings.get("command"), "date": settings.get("date")})
    runs.sort(key=lambda run: rows.index(run.get("label", run["method"])))  # the table's row order (stable)
    if len(pieces) == 1 and pieces[0][2] is None:
        return runs, dict(first), pieces[0][1].get("constant_baseline")
    last = pieces[-1][1]["settings"]
    starts = sorted(s["date"] for s in sources if s["date"])  # "YYYY-MM-DD HH:MM UTC" sorts as time
    merged = dict(first)
    merged.update(
        budget=last.get("budget"),  # the params pieces come last: GOAT's rows are the same at either budget
        rows=rows,
        lr_grid=lr_grid,
        ranks=ranks,
        pieces=sources,
        command=" ; ".join(f"{s['command']} (rows kept: {', '.join(s['rows'])})" for s in sources),
        date=" to ".join(dict.fromkeys(starts[:1] + starts[-1:])),  # the earliest and the latest piece's start
    )
    return runs, merged, pieces[0][1].get("constant_baseline")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    runs, settings, baseline = merge([read_piece(a) for a in argv[1:]])
    os.makedirs(argv[0], exist_ok=True)
    write_compare_report(argv[0], runs, settings, baseline)
    print(f"{argv[0]}: {len(runs)} runs, rows {', '.join(settings['rows'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
