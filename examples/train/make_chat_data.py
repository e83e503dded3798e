"""Generate a small chat corpus (JSONL of {"messages": [...]}) for SFT examples and tests: arithmetic
questions with worked answers, made here rather than fetched, so it is free of licences and hubs.

    python examples/train/make_chat_data.py -o chat.jsonl --count 200
"""

from __future__ import annotations

import argparse
import json
import random


def conversations(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        word = {"+": "plus", "-": "minus", "*": "times"}[op]
        messages = [{"role": "user", "content": f"What is {a} {word} {b}?"},
                    {"role": "assistant", "content": f"{a} {op} {b} = {value}."}]
        if rng.random() < 0.3:  # some two-turn conversations
            messages += [{"role": "user", "content": "And doubled?"},
                         {"role": "assistant", "content": f"2 * {value} = {2 * value}."}]
        out.append({"messages": messages})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with open(args.output, "w") as f:
        for conv in conversations(args.count, args.seed):
            f.write(json.dumps(conv) + "\n")


if __name__ == "__main__":
    main()
