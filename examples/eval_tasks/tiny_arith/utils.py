"""The tiny_arith task's data, built here: nothing is downloaded."""

import random


def load(**_: object) -> dict:
    import datasets
    rng = random.Random(0)
    rows = []
    for _i in range(24):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        wrong = rng.sample([s for s in range(19) if s != a + b], 3)
        choices = [str(c) for c in sorted(wrong + [a + b])]
        rows.append({"question": f"What is {a} + {b}?", "choices": choices, "answer": choices.index(str(a + b))})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
