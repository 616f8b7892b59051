"""Regenerate src/goat_lora/data_files/tiny_instructions.jsonl: a small, deterministic, offline
instruction-following set for causal-LM smoke training (no hub is reachable here).

Each line: {"instruction": ..., "response": ..., "text": "<prompt + response>"}. Tasks: addition,
subtraction, word reversal, upper-casing, sorting numbers, capitals, antonyms, plural forms.
Run: python scripts/make_instructions.py
"""

import json
import os
import random

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Brazil": "Brasilia",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Austria": "Vienna",
    "Ireland": "Dublin",
    "Russia": "Moscow",
    "Turkey": "Ankara",
    "Iran": "Tehran",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Mexico": "Mexico City",
    "Argentina": "Buenos Aires",
    "Cuba": "Havana",
    "Denmark": "Copenhagen",
}
ANTONYMS = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "open": "closed",
    "early": "late",
    "full": "empty",
    "hard": "soft",
    "high": "low",
    "old": "young",
    "rich": "poor",
    "strong": "weak",
    "wet": "dry",
    "loud": "quiet",
    "clean": "dirty",
    "near": "far",
    "thick": "thin",
}
PLURALS = {
    "cat": "cats",
    "box": "boxes",
    "child": "children",
    "mouse": "mice",
    "city": "cities",
    "leaf": "leaves",
    "man": "men",
    "tooth": "teeth",
    "bus": "buses",
    "baby": "babies",
    "knife": "knives",
    "foot": "feet",
}
WORDS = "apple river stone cloud green quick light music paper table window garden little bright".split()


def make(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(8)
    if kind == 0:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 1:
        a, b = sorted((rng.randint(0, 50), rng.randint(0, 50)), reverse=True)
        return f"What is {a} minus {b}?", str(a - b)
    if kind == 2:
        words = rng.sample(WORDS, 3)
        return "Reverse the order of these words: " + " ".join(words), " ".join(reversed(words))
    if kind == 3:
        words = rng.sample(WORDS, 2)
        return "Write in capital letters: " + " ".join(words), " ".join(words).upper()
    if kind == 4:
        nums = rng.sample(range(100), 4)
        return "Sort from smallest to largest: " + ", ".join(map(str, nums)), ", ".join(map(str, sorted(nums)))
    if kind == 5:
        country = rng.choice(sorted(CAPITALS))
        return f"What is the capital of {country}?", CAPITALS[country]
    if kind == 6:
        word = rng.choice(sorted(ANTONYMS))
        return f"Give the opposite of '{word}'.", ANTONYMS[word]
    word = rng.choice(sorted(PLURALS))
    return f"What is the plural of '{word}'?", PLURALS[word]


def main(n: int = 600, seed: int = 0) -> None:
    rng = random.Random(seed)
    out = os.path.join(os.path.dirname(__file__), "..", "src", "goat_lora", "data_files", "tiny_instructions.jsonl")
    with open(out, "w", encoding="utf-8") as fh:
        for _ in range(n):
            instruction, response = make(rng)
            text = f"### Instruction:\n{instruction}\n### Response:\n{response}"
            fh.write(json.dumps({"instruction": instruction, "response": response, "text": text}) + "\n")
    print(f"wrote {n} examples to {os.path.normpath(out)}")


if __name__ == "__main__":
    main()
