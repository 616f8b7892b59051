"""Real question / answer data that ships offline: the quiz files of Debian's `bsdgames` package.

    apt-get install bsdgames  ->  /usr/share/games/bsdgames/quiz/{africa,america,asia,europe,state,province,...}

Each line of a quiz file is one fact, its fields separated by ':' (africa: `country:capital`, state:
`state:capital:abbreviation:flower`, elements: `symbol:number:weight:name`). A field is a small
pattern language (quiz(6)):

    a|b      alternatives             Algiers|Alger
    {x}      an optional part         Central Africa{n Rep{ublic}}
    [a|b]    a group of alternatives  Bra[z|s]il, Yaound['e|e'|e] (an accent written as two characters)
    \\c       the character c itself; a backslash at the end of a line continues it

(The files overstrike accents, 'e written as ' backspace e; the backspace is dropped on reading.)

`expand` lists every string a field accepts (quiz(6) accepts each as a correct answer); `display`
picks the one to show: every optional part included, the first alternative of each choice, and an
accent written as two characters ('e, e') shown as the accented letter (é). A question field lists a
name with its abbreviations (`Alabama|Ala|AL`, `SGSSI|South Georgia and ...`), so a question shows
its longest alternative instead.

Two built-in qa data sets are made from them (a fixed 20% of the questions, seed 0, is the test set,
the same whatever --seed, like the other families' built-in test sets):

    quiz-capitals  283 questions "What is the capital of Peru?" (countries of five continents), "... of
                   Ohio, USA?", "... of Manitoba, Canada?"; the gold is every accepted form of the
                   capital (Lima; Bras['i|i'|i]lia -> Brasília, Bras'ilia, Brasi'lia, Brasilia); --answer-type text
    quiz-elements  103 questions "What is the atomic number of Helium?"; --answer-type number
"""

from __future__ import annotations

import os
import random
import unicodedata

QUIZ_DIR = "/usr/share/games/bsdgames/quiz"
INSTALL_HINT = "apt-get install bsdgames (scripts/install.sh does it)"
TEST_FRACTION, SPLIT_SEED = 0.2, 0

# An accent written as two characters in a [] group: the mark before or after the letter.
ACCENTS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", "~": "\u0303", ",": "\u0327", '"': "\u0308", "°": "\u030a"}
STROKED = {"o": "ø", "O": "Ø"}  # "o/" has no combining form


# ---- the pattern language -------------------------------------------------------------------------
def parse(pattern: str) -> list:
    """A field -> its alternatives: a list of sequences, each a list of items: a string, or
    ("opt", alternatives) for {...}, or ("group", alternatives) for [...]."""
    alternatives, position = _parse_alternatives(pattern, 0, None)
    if position != len(pattern):
        raise ValueError(f"quiz pattern {pattern!r}: unexpected {pattern[position]!r} at {position}")
    return alternatives


def _parse_alternatives(text: str, i: int, close: str | None) -> tuple[list, int]:
    alternatives, sequence, literal = [], [], ""
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            literal, i = literal + text[i + 1], i + 2
            continue
        if char in "{[":
            inner, i = _parse_alternatives(text, i + 1, "}" if char == "{" else "]")
            sequence += [literal] if literal else []
            sequence.append(("opt" if char == "{" else "group", inner))
            literal = ""
            continue
        if char == "|" or char == close or char in "}]":
            if char in "}]" and char != close:
                break  # an unbalanced bracket: the caller reports it
            sequence += [literal] if literal else []
            alternatives.append(sequence)
            sequence, literal = [], ""
            i += 1
            if char == close:
                return alternatives, i
            continue
        literal, i = literal + char, i + 1
    if close is not None:
        raise ValueError(f"quiz pattern {text!r}: {close!r} missing")
    sequence += [literal] if literal else []
    alternatives.append(sequence)
    return alternatives, i


def expand(alternatives: list) -> list[str]:
    """Every string the alternatives accept, in order, without repeats."""
    out: list[str] = []
    for sequence in alternatives:
        forms = [""]
        for item in sequence:
            if isinstance(item, str):
                choices = [item]
            else:
                kind, inner = item
                choices = expand(inner) + ([""] if kind == "opt" else [])
            forms = [f + c for f in forms for c in choices]
        out += forms
    return list(dict.fromkeys(out))


def display(alternatives: list, longest: bool = False) -> str:
    """The form to show (module docstring): optional parts included, first alternatives, accents
    composed; `longest`: the longest top-level alternative instead of the first."""
    shown = [_display_sequence(sequence) for sequence in alternatives]
    return max(shown, key=len) if longest else shown[0]


def _display_sequence(sequence: list) -> str:
    text = ""
    for item in sequence:
        if isinstance(item, str):
            text += item
        elif item[0] == "opt":
            text += display(item[1])
        else:
            text += _accented(_display_sequence(item[1][0]))
    return text


def _accented(text: str) -> str:
    """'e or e' -> é, o/ -> ø; anything else unchanged."""
    if len(text) == 2:
        for mark, letter in (text, text[::-1]):
            if letter.isalpha() and mark in ACCENTS:
                return unicodedata.normalize("NFC", letter + ACCENTS[mark])
            if mark == "/" and letter in STROKED:
                return STROKED[letter]
    return text


# ---- the files ----------------------------------------------------------------------------------
def read_quiz(name: str, quiz_dir: str = QUIZ_DIR) -> list[list[str]]:
    """The lines of quiz file `name` as lists of raw fields (continuation lines joined)."""
    path = os.path.join(quiz_dir, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"quiz file {path!r} is missing; the quiz data sets need it: {INSTALL_HINT}")
    rows, pending = [], ""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = pending + line.rstrip("\n").replace("\b", "")  # accents are overstruck: e<BS>' -> e'

            if line.endswith("\\") and not line.endswith("\\\\"):
                pending = line[:-1]
                continue
            pending = ""
            if line.strip():
                rows.append(_split_fields(line))
    return rows


def _split_fields(line: str) -> list[str]:
    """Split on ':' that is not escaped by a backslash (the escape stays for `parse`)."""
    fields, current, i = [], "", 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line):
            current, i = current + line[i : i + 2], i + 2
        elif line[i] == ":":
            fields, current, i = fields + [current], "", i + 1
        else:
            current, i = current + line[i], i + 1
    return fields + [current]


# (file, question field, answer field, question text with {} for the shown question field)
CAPITALS = [
    ("africa", 0, 1, "What is the capital of {}?"),
    ("america", 0, 1, "What is the capital of {}?"),
    ("asia", 0, 1, "What is the capital of {}?"),
    ("europe", 0, 1, "What is the capital of {}?"),
    ("state", 0, 1, "What is the capital of {}, USA?"),
    ("province", 0, 1, "What is the capital of {}, Canada?"),
]
ELEMENTS = [("elements", 3, 1, "What is the atomic number of {}?")]


def questions(spec: list[tuple[str, int, int, str]], quiz_dir: str = QUIZ_DIR) -> tuple[list[str], list[list[str]]]:
    """(questions, accepted answers per question: the shown form first, then every other form).
    A question asked by two files (Russia is in asia and in europe) is kept once, where it first
    appears, with the answers of both."""
    answers: dict[str, list[str]] = {}
    for name, asked, answered, template in spec:
        for fields in read_quiz(name, quiz_dir):
            if max(asked, answered) >= len(fields) or not fields[asked].strip() or not fields[answered].strip():
                continue  # quiz(6) skips a fact whose question or answer is empty
            subject = display(parse(fields[asked]), longest=True)
            if name == "province" and subject == "Canada":
                continue  # the province file ends with the country itself, asked in america
            answer = parse(fields[answered])
            question = template.format(subject)
            answers[question] = list(dict.fromkeys([*answers.get(question, []), display(answer), *expand(answer)]))
    return list(answers), list(answers.values())


def fixed_split(n: int) -> tuple[list[int], list[int]]:
    """(train indices, test indices): a seeded 20% test split that does not depend on --seed."""
    order = list(range(n))
    random.Random(SPLIT_SEED).shuffle(order)
    cut = max(1, round(TEST_FRACTION * n))
    return sorted(order[cut:]), sorted(order[:cut])
