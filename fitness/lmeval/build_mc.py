"""Regenerate the multiple-choice cipher data of the local lm-eval tasks, bit for bit.

Each record of ``fitness/zoo/combined.{search,heldout}.jsonl`` (a string of letters from
all three zoo slices and its digit cipher) becomes a 4-way multiple-choice item: the right
cipher and three distractors, the ciphers of other records of the same length, at a
seeded random position. Run from anywhere: ``python fitness/lmeval/build_mc.py``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
ZOO = HERE.parent / "zoo"
SPLITS = {"validation": "combined.search.jsonl", "test": "combined.heldout.jsonl"}
NUM_CHOICES = 4
SEED = 20250612


def mc_records(records: list[dict], seed: str) -> list[dict]:
    rng = random.Random(seed)
    by_len: dict[int, list[str]] = {}
    for r in records:
        by_len.setdefault(len(r["target"]), []).append(r["target"])
    out = []
    for r in records:
        pool = sorted({t for t in by_len[len(r["target"])] if t != r["target"]})
        distractors = rng.sample(pool, NUM_CHOICES - 1)
        answer = rng.randrange(NUM_CHOICES)
        choices = distractors[:answer] + [r["target"]] + distractors[answer:]
        out.append({"input": r["input"], "choices": choices, "answer": answer,
                    "target": r["target"], "skill": r["skill"]})
    return out


def main() -> None:
    (HERE / "data").mkdir(exist_ok=True)
    for split, name in SPLITS.items():
        with open(ZOO / name, encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
        lines = [json.dumps(r, sort_keys=True) for r in mc_records(records, f"{SEED}:{split}")]
        path = HERE / "data" / f"cipher_mc.{split}.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")
        print(path)


if __name__ == "__main__":
    main()
