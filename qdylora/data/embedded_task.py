"""The embedded default task: short instructions whose answers can be checked exactly, made offline.

Three kinds of item, drawn with a seed: upper-casing a word, adding two small numbers, and naming
the last word of a short list. The instruct model answers them in full sentences, so exact match
starts near zero and rises as the adapter learns the terse answer format and the skill.
"""

from __future__ import annotations

import random

WORDS = (
    "apple river stone cloud garden window silver forest candle bridge orange pencil winter summer "
    "rocket planet island mirror castle dragon button basket ticket jacket violin camera engine "
    "harbor meadow pepper lemon tiger zebra rabbit turtle falcon spider butter cookie pillow blanket "
    "ladder hammer anchor compass lantern marble saddle thunder valley desert canyon glacier"
).split()


def make_item(rng: random.Random) -> dict:
    """One Alpaca-style record with an exact answer."""
    kind = rng.randrange(3)
    if kind == 0:
        w = rng.choice(WORDS)
        return {"instruction": f"Write the word '{w}' in capital letters. Answer with the word only.",
                "input": "", "output": w.upper()}
    if kind == 1:
        a, b = rng.randrange(10, 50), rng.randrange(10, 50)
        return {"instruction": f"What is {a} + {b}? Answer with the number only.", "input": "", "output": str(a + b)}
    ws = rng.sample(WORDS, 4)
    return {"instruction": "Which word comes last in this list? Answer with the word only.",
            "input": ", ".join(ws), "output": ws[-1]}


def make_task(n: int, seed: int = 0) -> list[dict]:
    """n records of the default task, the same for the same seed."""
    rng = random.Random(seed)
    return [make_item(rng) for _ in range(n)]


def default_splits(n_train: int = 512, n_eval: int = 64, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train / held-out records (different seeds, duplicates of train removed from eval)."""
    train = make_task(n_train, seed)
    seen = {(r["instruction"], r["input"]) for r in train}
    held = [r for r in make_task(n_eval * 3, seed + 1) if (r["instruction"], r["input"]) not in seen][:n_eval]
    return train, held
