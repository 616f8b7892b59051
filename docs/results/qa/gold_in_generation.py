"""A diagnostic beside exact match: how many generations *mention* a gold answer anywhere.

Exact match reads the answer from the generation's first line (--answer-type text); a base model that
answers "The capital of Egypt is Cairo." in a sentence scores 0 there although it knew the answer.
This counts, per predictions.jsonl, the rows whose whole normalised generation contains one of the
normalised gold answers as whole words. It is lenient (a generation listing several cities counts),
so it is an upper bound on what the model knew, not a metric of the task.

    PYTHONPATH=src python docs/results/qa/gold_in_generation.py RUN/predictions.jsonl ...
"""

import json
import re
import sys

from goat_lora.tasks.qa import normalize_text

for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    mentioned = 0
    for row in rows:
        golds = row["gold_extracted"] if isinstance(row["gold_extracted"], list) else [row["gold_extracted"]]
        generation = normalize_text(row["generation"])
        mentioned += any(re.search(rf"\b{re.escape(g)}\b", generation) for g in golds)
    exact = sum(row["correct"] for row in rows)
    print(f"{path}: exact match {exact}/{len(rows)}, gold mentioned {mentioned}/{len(rows)}")
