"""`--task qa`: a decoder fine-tuned on prompt -> answer pairs, scored by the exact match of a
generated answer (GSM8K's and the commonsense sets' form in the paper's LLaMA runs).

    --text-column Q (the prompt) --label-column A (the gold answer) [--target-column T] --answer-type number|choice|text
    --prompt-template instruction|alpaca|plain|"...{prompt}..."   --max-new-tokens N
    metrics: exact_match, loss (mean cross-entropy on the target tokens)

Training: each example is the prompt (shown through the template) followed by the target and EOS;
the labels are -100 on the prompt and on padding, so the loss falls on the target tokens only. The
target is --target-column when given (GSM8K's worked solution, the commonsense `output` "the correct
answer is answer1"), else the label column. Evaluation: batched greedy generation of up to
--max-new-tokens tokens after the prompt; the answer is read from the generation and from the gold
answer by the same extractor (`extract_answer`), and an example is correct when the two agree.
predictions.jsonl keeps every prompt, generation, extracted answer and gold answer.

What counts as the answer in a generation (a model may go on talking after it):
    number  the number after "####" when there is one, else the last number (GSM8K's convention)
    choice  the first option word (answer2, option1, solution1, ending3, true / false, a letter A-E)
    text    the first non-empty line, normalised as SQuAD does (lower case, no punctuation or articles)
            and without accents
A row longer than --max-length is cut at its end, as causal-lm does; the commonsense sets' `input`
field (empty in their rows) is not part of the prompt.

    GSM8K (question, answer "...\\n#### 18"; the default columns):  --answer-type number
    commonsense (instruction, input, output "the correct answer is answer1", answer "answer1"):
        --text-column instruction --label-column answer --target-column output --answer-type choice

Built in (offline, Debian's bsdgames quiz files, tasks/quiz.py): `quiz-capitals` (275 capitals of
countries, US states and Canadian provinces; every accepted spelling counts) and `quiz-elements`
(103 atomic numbers). A gold answer may be a list of accepted answers; a generation is correct when
it matches any of them.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from decimal import Decimal, InvalidOperation

from . import quiz
from .base import Evaluation, ModelParts, Split, TaskData
from .causal_lm import pad_for_causal_lm, token_loss
from .decoders import DEFAULT_DECODER, decoder_targets, generate_greedy, load_decoder, refuse_head_only
from .tables import load_tables, note_dropped, read_table, require_columns, subsample, train_validation_test

# ---- prompts ------------------------------------------------------------------------------------
TEMPLATES = {
    "instruction": "### Instruction:\n{prompt}\n\n### Response:\n",
    # LLM-Adapters' template, the one the paper's LLaMA runs used (rows without an input)
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n",
    "plain": "{prompt}\n",
}


def template_text(template: str) -> str:
    """The text of --prompt-template: a name in TEMPLATES, or a text holding {prompt}."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{prompt}" not in template:
        names = ", ".join(TEMPLATES)
        raise ValueError(f"--prompt-template {template!r} is neither {names} nor a text holding {{prompt}}")
    return template


def format_prompt(template: str, prompt: str) -> str:
    # replace, not str.format: a user's template may hold other braces (JSON, LaTeX)
    return template_text(template).replace("{prompt}", prompt)


# ---- reading an answer ----------------------------------------------------------------------------

_NUMBER = re.compile(r"(?:(?<![0-9A-Za-z])-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_CHOICE = re.compile(
    r"(?i:\b(?P<word>(?:answer|option|solution|ending)\d+|true|false)\b)"
    r"|(?<![A-Za-z0-9'])(?P<open>\()?(?P<letter>[A-E])(?P<close>\))?(?![A-Za-z0-9'])"
)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def extract_number(text: str) -> str:
    """The number after "####" when there is one, else the last number in the text; normalised:
    no "$" or thousands commas, no trailing zeros ("" when there is none).

        "Natalia sold 48 + 24 = 72 clips.\\n#### 72"  -> "72"
        "#### -3"                                       -> "-3"
        "It costs $1,234.50 in total."                  -> "1234.5"
        "18.0"                                          -> "18"
        "1,000 apples, then 5-3 = 2"                    -> "2"
        "no digits here"                                -> ""
    """
    _, marker, after = text.partition("####")
    found = _NUMBER.search(after) if marker else None
    if found is None:
        numbers = _NUMBER.findall(text)
        if not numbers:
            return ""
        value = numbers[-1]
    else:
        value = found.group()
    try:
        number = Decimal(value.replace(",", "").replace("$", ""))
    except InvalidOperation:
        return ""
    if number == number.to_integral_value():
        return str(int(number))  # 18.0 -> 18, -0 -> 0
    return format(number.normalize(), "f")  # 1234.50 -> 1234.5, never 1.2345E+3


def extract_choice(text: str) -> str:
    """The first option word in the text, lower-cased: answerN, optionN, solutionN, endingN, true,
    false, or a capital letter A-E standing alone ("" when there is none). An "A" followed by a
    lower-case word reads as the article and is skipped unless it is in parentheses.

        "the correct answer is answer2"  -> "answer2"
        "Option1 fits better"            -> "option1"
        "ending3"                        -> "ending3"
        "True."                          -> "true"
        "(B)"   "B"   "Answer: C."       -> "b"   "b"   "c"
        "A cat sat on the mat"           -> ""
    """
    for match in _CHOICE.finditer(text):
        if match.group("word"):
            return match.group("word").lower()
        letter = match.group("letter")
        parenthesised = match.group("open") and match.group("close")
        if letter == "A" and not parenthesised and re.match(r"\s+[a-z]", text[match.end() :]):
            continue  # "A cat": the article
        return letter.lower()
    return ""


def normalize_text(text: str) -> str:
    """SQuAD's answer normalisation plus accents: lower case, accents dropped (é -> e),
    punctuation and symbols removed, the articles a / an / the removed, spaces collapsed."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(
        c
        for c in text
        if not unicodedata.combining(c) and unicodedata.category(c)[0] not in "PSC" or c in string.whitespace
    )
    return " ".join(_ARTICLES.sub(" ", text.lower()).split())


def extract_text(text: str) -> str:
    """The first non-empty line, normalised (a model may go on after its answer on later lines).

    "Paris"                            -> "paris"
    "  The   Hague!\\nNext question..."  -> "hague"
    "Port-au-Prince"                   -> "portauprince"
    "Yaoundé"  "Yaound'e"              -> "yaounde"
    """
    for line in text.splitlines():
        if line.strip():
            return normalize_text(line)
    return ""


EXTRACTORS = {"number": extract_number, "choice": extract_choice, "text": extract_text}


def extract_answer(text: str, answer_type: str) -> str:
    """The answer in `text` (a generation or a gold answer) under --answer-type; "" when none."""
    return EXTRACTORS[answer_type](str(text))


def gold_answers(accepted: list[str], answer_type: str) -> list[str]:
    """The extracted forms of a gold answer's accepted strings, without repeats or empties."""
    return [g for g in dict.fromkeys(extract_answer(a, answer_type) for a in accepted) if g]


# ---- data ---------------------------------------------------------------------------------------
# Built-in data sets: (quiz questions spec, answer type)
BUILTINS = {"quiz-capitals": (quiz.CAPITALS, "text"), "quiz-elements": (quiz.ELEMENTS, "number")}
VALIDATION_CAP = 100  # per-epoch validation generates an answer per example: keep it cheap


def builtin(name: str) -> tuple[Split, Split, dict]:
    """(train, test, info) of a quiz data set: inputs {"prompt", "target"}, labels = accepted answers."""
    spec, _ = BUILTINS[name]
    texts, answers = quiz.questions(spec)
    whole = Split([{"prompt": t, "target": a[0]} for t, a in zip(texts, answers)], answers)
    train, test = quiz.fixed_split(len(whole))
    info = {
        "source": f"bsdgames quiz files {[s[0] for s in spec]} in {quiz.QUIZ_DIR}",
        "test_split": f"a fixed {quiz.TEST_FRACTION:.0%} of the questions (seed {quiz.SPLIT_SEED})",
    }
    return whole.subset(train), whole.subset(test), info


def read_pairs(frame, settings, source: str, info: dict | None = None) -> Split:
    """A table -> Split of {"prompt", "target"} inputs and [gold answer] labels; empty and blank rows
    are left out and recorded in `info` (tables.note_dropped)."""
    columns = {
        "--text-column": settings.text_column,
        "--label-column": settings.label_column,
        "--target-column": settings.target_column,
    }
    kept = require_columns(frame, columns, source, info)
    target_column = settings.target_column or settings.label_column
    inputs, labels = [], []
    for prompt, label, target in zip(kept[settings.text_column], kept[settings.label_column], kept[target_column]):
        prompt, label, target = str(prompt), _answer_string(label), _answer_string(target)
        if prompt.strip() and label.strip() and target.strip():
            inputs.append({"prompt": prompt, "target": target})
            labels.append([label])
    note_dropped(info, source, len(kept) - len(inputs), "a prompt, answer or target of only spaces")
    return Split(inputs, labels)


def _answer_string(value) -> str:
    """pandas reads an integer column with gaps as floats: 72.0 -> "72"."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


def check_gold(split: Split, answer_type: str, source: str) -> None:
    """Refuse a gold answer the extractor finds nothing in (it could never be matched), naming it:
    usually a wrong --answer-type or --label-column."""
    for index, accepted in enumerate(split.labels):
        if not gold_answers(accepted, answer_type):
            raise ValueError(
                f"data {source!r}: gold answer {str(accepted[0])[:60]!r} (example {index}) holds no "
                f"{answer_type} answer; check --answer-type and --label-column"
            )


# ---- the family -----------------------------------------------------------------------------------
class QA:
    name = "qa"
    metrics = ("exact_match", "loss")
    lower_is_better = frozenset({"loss"})
    baseline_name = "most frequent answer"
    builtin_data = tuple(BUILTINS)

    def defaults(self, settings) -> dict:
        """max_length 256: LLM-Adapters' cutoff for the paper's LLaMA runs; it holds a GSM8K question
        with its worked solution in the alpaca template. Built-in sets bring their answer type."""
        data = settings.data or "quiz-capitals"
        answer_type = BUILTINS[data][1] if data in BUILTINS else "text"
        if settings.prompt_template is not None:
            template_text(settings.prompt_template)  # a bad template fails before any loading
        return {
            "data": data,
            "model": DEFAULT_DECODER,
            "text_column": "question",
            "label_column": "answer",
            "answer_type": answer_type,
            "prompt_template": "instruction",
            "max_new_tokens": 32,
            "epochs": 1,
            "batch_size": 8,
            "max_length": 256,
        }

    def load_data(self, settings) -> TaskData:
        template_text(settings.prompt_template)
        if settings.data in BUILTINS:
            train, test, info = builtin(settings.data)
        else:
            tables = load_tables(settings, settings.label_column)
            train, test, info = read_pairs(tables.train, settings, settings.data, tables.info), None, tables.info
            if tables.test is not None:
                test = read_pairs(tables.test, settings, settings.test_data or f"{settings.data}:test", info)
        check_gold(train, settings.answer_type, settings.data)
        if test is not None:
            check_gold(test, settings.answer_type, settings.test_data or settings.data)
        train, validation, test = train_validation_test(train, test, settings, info)
        validation = subsample(validation, VALIDATION_CAP, settings.seed)
        info["answer_type"] = settings.answer_type  # the constant baseline reads answers the same way
        return TaskData(settings.data, {}, train, validation, test, info)

    def build(self, settings, meta: dict) -> ModelParts:
        refuse_head_only(settings, self.name)
        model, tokenizer = load_decoder(settings)
        collator = QACollator(tokenizer, settings.max_length, settings.prompt_template, settings.pad_to_multiple)
        return ModelParts(model, collator, decoder_targets(model, settings), [], meta, tokenizer)

    def evaluate(self, model, split: Split, parts: ModelParts, settings, device) -> Evaluation:
        loss = token_loss(model, split, parts.collator, settings.eval_batch_size, device)
        prompts = [format_prompt(settings.prompt_template, x["prompt"]) for x in split.inputs]
        generated = generate_greedy(
            model, parts.tokenizer, prompts, settings.max_new_tokens, batch_size=settings.eval_batch_size
        )
        rows = []
        for out, accepted in zip(generated, split.labels):
            extracted = extract_answer(out["completion"], settings.answer_type)
            gold = gold_answers(accepted, settings.answer_type)
            rows.append(
                {
                    "prompt": out["prompt"],
                    "generation": out["completion"],
                    "extracted": extracted,
                    "gold": accepted[0] if len(accepted) == 1 else accepted,
                    "gold_extracted": gold[0] if len(gold) == 1 else gold,
                    "correct": bool(extracted) and extracted in gold,
                }
            )
        exact = sum(r["correct"] for r in rows) / len(rows) if rows else float("nan")
        return Evaluation({"exact_match": exact, "loss": loss}, rows=rows)

    def constant_baseline(self, data: TaskData) -> dict:
        """Always answering the training set's most frequent gold answer."""
        answer_type = data.info.get("answer_type")
        return {"exact_match": constant_answer_match(data.train, data.test, answer_type)} if answer_type else {}

    def load_eval_split(self, settings, source: str, meta: dict) -> Split:
        if source in BUILTINS:
            split = builtin(source)[1]
        else:
            split = read_pairs(read_table(source), settings, source)
        check_gold(split, settings.answer_type, source)
        return split


def constant_answer_match(train: Split, test: Split, answer_type: str) -> float:
    """Exact match on `test` of always giving the most frequent (extracted) answer of `train`."""
    answers = [gold_answers(accepted, answer_type)[0] for accepted in train.labels]
    if not answers or not len(test):
        return float("nan")
    most = max(sorted(set(answers)), key=answers.count)
    return sum(most in gold_answers(accepted, answer_type) for accepted in test.labels) / len(test)


class QACollator:
    """Prompt (through the template) + target + EOS, right padding; labels -100 on the prompt and
    the padding. The prompt is tokenised alone, as generation sees it, and the target after it
    without special tokens; a row longer than max_length is cut at the end (as causal-lm does)."""

    def __init__(self, tokenizer, max_length: int, template: str, pad_multiple: int | None = None) -> None:
        self.tokenizer, self.max_length, self.template = tokenizer, max_length, template
        self.pad_multiple = pad_multiple  # round the padded length up to a multiple of it (at most max_length)

    def encode(self, prompt: str, target: str) -> tuple[list[int], int]:
        """(ids, number of leading prompt tokens, which get no loss)."""
        tok = self.tokenizer
        head = tok(format_prompt(self.template, prompt))["input_ids"]
        tail = tok(target, add_special_tokens=False)["input_ids"]
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        ids = (head + tail + eos)[: self.max_length]
        return ids, min(len(head), len(ids))

    def __call__(self, batch: list[dict]) -> dict:
        return pad_for_causal_lm(
            [self.encode(item["input"]["prompt"], item["input"]["target"]) for item in batch],
            self.tokenizer,
            self.pad_multiple,
            self.max_length,
        )
