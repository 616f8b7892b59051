"""`goat train --task qa`: answer extraction, the loss mask, the quiz data format, and runs on a
GSM8K-style JSONL and a commonsense-style JSON that `goat eval` reproduces after reloading.

The runs use a tiny random LLaMA (2 layers, hidden 32) with a small byte-level BPE tokenizer
trained on the fixtures' own texts; each takes a few seconds.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from goat_lora.tasks import qa, quiz
from goat_lora.tasks.base import Split
from goat_lora.testing import save_tiny_decoder

# ---- answer extraction ------------------------------------------------------------------------------
EXTRACTION = [
    # (text, answer type, extracted)
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "number", "72"),
    ("#### -3", "number", "-3"),
    ("It costs $1,234.50 in total.", "number", "1234.5"),
    ("#### 1,000", "number", "1000"),
    ("18.0", "number", "18"),
    ("The answer is 42.", "number", "42"),
    ("1,000 apples, then 5-3 = 2", "number", "2"),  # the last number; "5-3" is no negative three
    ("#### 7\n\nQuestion: 12 more?", "number", "7"),  # after ####, not the last number
    ("no digits here", "number", ""),
    ("the correct answer is answer2", "choice", "answer2"),
    ("Option1 fits better than option2", "choice", "option1"),
    ("ending3", "choice", "ending3"),
    ("Solution2", "choice", "solution2"),
    ("True.", "choice", "true"),
    ("FALSE", "choice", "false"),
    ("(B)", "choice", "b"),
    ("B", "choice", "b"),
    ("Answer: C.", "choice", "c"),
    ("(A) a cat", "choice", "a"),
    ("A", "choice", "a"),
    ("A cat sat on the mat", "choice", ""),  # the article, not option A
    ("answer12 then answer1", "choice", "answer12"),
    ("Paris", "text", "paris"),
    ("  The   Hague!\nNext question: ...", "text", "hague"),  # first line; article and punctuation dropped
    ("Port-au-Prince", "text", "portauprince"),
    ("Yaoundé", "text", "yaounde"),
    ("Yaound'e", "text", "yaounde"),  # the quiz files' two-character accent
    ("\n\n  São   Tomé ", "text", "sao tome"),
    ("Washington, D.C.", "text", "washington dc"),
    ("", "text", ""),
]


@pytest.mark.parametrize("text,answer_type,expected", EXTRACTION)
def test_extract_answer(text, answer_type, expected):
    assert qa.extract_answer(text, answer_type) == expected


def test_numbers_compare_after_normalisation():
    assert qa.extract_answer("#### 1,000", "number") == qa.extract_answer("so 1000 in all", "number")
    assert qa.extract_answer("18.0", "number") == qa.extract_answer("#### 18", "number")
    assert qa.extract_answer("$5.50", "number") != qa.extract_answer("5.05", "number")


def test_gold_answers_accept_every_form():
    assert qa.gold_answers(["Yaoundé", "Yaound'e", "Yaounde'", "Yaounde"], "text") == ["yaounde"]
    assert qa.gold_answers(["Rome", "Roma"], "text") == ["rome", "roma"]
    assert qa.gold_answers(["answer1"], "choice") == ["answer1"]


def test_constant_baseline_is_the_most_frequent_training_answer():
    train = Split([None] * 5, [["#### 3"], ["#### 3"], ["#### 4"], ["3.0"], ["#### 5"]])
    test = Split([None] * 4, [["#### 3"], ["#### 4"], ["3"], ["so 30"]])
    assert qa.constant_answer_match(train, test, "number") == 0.5


# ---- prompts ------------------------------------------------------------------------------------
def test_prompt_templates():
    assert qa.format_prompt("instruction", "Q?") == "### Instruction:\nQ?\n\n### Response:\n"
    assert qa.format_prompt("alpaca", "Q?").startswith("Below is an instruction that describes a task.")
    assert qa.format_prompt("alpaca", "Q?").endswith("### Instruction:\nQ?\n\n### Response:\n")
    assert qa.format_prompt("plain", "Q?") == "Q?\n"
    assert qa.format_prompt('{"q": "{prompt}"} A:', "Q?") == '{"q": "Q?"} A:'  # other braces stay
    with pytest.raises(ValueError, match="neither instruction, alpaca, plain nor a text holding"):
        qa.template_text("Question: ")


# ---- the quiz files -------------------------------------------------------------------------------
PATTERNS = [
    # (pattern, every accepted form, shown form)
    ("Algiers", ["Algiers"], "Algiers"),
    ("Banjul|Bathurst", ["Banjul", "Bathurst"], "Banjul"),
    (
        "Central Africa{n Rep{ublic}}",
        ["Central African Republic", "Central African Rep", "Central Africa"],
        "Central African Republic",
    ),
    ("Bra[z|s]il", ["Brazil", "Brasil"], "Brazil"),
    ("Yaound['e|e'|e]", ["Yaound'e", "Yaounde'", "Yaounde"], "Yaoundé"),
    ("{The }Gambia", ["The Gambia", "Gambia"], "The Gambia"),
    ("Port[-| ]au", ["Port-au", "Port au"], "Port-au"),
    ("K[o|o/|/o]benhavn", ["Kobenhavn", "Ko/benhavn", "K/obenhavn"], "Kobenhavn"),
    ("a\\|b", ["a|b"], "a|b"),
]


@pytest.mark.parametrize("pattern,forms,shown", PATTERNS)
def test_quiz_patterns(pattern, forms, shown):
    tree = quiz.parse(pattern)
    assert quiz.expand(tree) == forms
    assert quiz.display(tree) == shown


def test_quiz_questions_from_files(tmp_path):
    (tmp_path / "africa").write_text("Cameroon:Yaound['e|e'|e]\nEgypt:Cairo\n:Nowhere\n", encoding="utf-8")
    (tmp_path / "asia").write_text("Egypt:Cairo|Al Qahira\nSGSSI|South Georgia:Grytviken\n", encoding="utf-8")
    texts, answers = quiz.questions(
        [("africa", 0, 1, "Capital of {}?"), ("asia", 0, 1, "Capital of {}?")], str(tmp_path)
    )
    assert texts == ["Capital of Cameroon?", "Capital of Egypt?", "Capital of South Georgia?"]
    assert answers[0] == ["Yaoundé", "Yaound'e", "Yaounde'", "Yaounde"]  # the shown form first: the target
    assert answers[1] == ["Cairo", "Al Qahira"]  # asked twice: once, with both files' answers


def test_quiz_missing_files_name_the_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install bsdgames"):
        quiz.read_quiz("africa", str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(quiz.QUIZ_DIR), reason="bsdgames is not installed")
def test_builtin_quiz_capitals():
    train, test, _ = qa.builtin("quiz-capitals")
    assert (len(train), len(test)) == (220, 55)
    questions = {x["prompt"]: accepted for x, accepted in zip(train.inputs + test.inputs, train.labels + test.labels)}
    assert questions["What is the capital of Ohio, USA?"] == ["Columbus"]
    assert "Brasilia" in questions["What is the capital of Brazil?"]
    assert qa.gold_answers(questions["What is the capital of Brazil?"], "text") == ["brasilia"]
    train, test, _ = qa.builtin("quiz-elements")
    assert len(train) + len(test) == 103 and ["2"] in train.labels + test.labels


# ---- the tiny decoder and the data fixtures ---------------------------------------------------------
GSM_PAIRS = [
    (3, 4),
    (5, 2),
    (10, 7),
    (1, 1),
    (6, 9),
    (12, 3),
    (8, 8),
    (2, 15),
    (20, 5),
    (7, 0),
    (4, 4),
    (9, 1),
    (11, 6),
    (14, 2),
    (3, 13),
    (5, 5),
    (16, 1),
    (2, 2),
    (6, 3),
    (1, 18),
]
GSM_ROWS = [
    {
        "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
        "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}",
    }
    for a, b in GSM_PAIRS
]
# (lighter, heavier, whether the heavier one is listed first)
COMMONSENSE_THINGS = [
    ("a feather", "a truck", True),
    ("a coin", "a horse", False),
    ("a cup", "a house", True),
    ("a leaf", "a car", False),
    ("a hair", "a rock", True),
    ("a pen", "a piano", False),
    ("a mouse", "an elephant", True),
    ("a spoon", "a boat", False),
    ("a pin", "a desk", True),
    ("a grape", "a bus", False),
    ("an ant", "a whale", True),
    ("a key", "a bear", False),
    ("a bee", "a train", True),
    ("a sock", "a cow", False),
    ("a petal", "a tank", True),
    ("a nail", "a fridge", False),
    ("a bead", "a ship", True),
    ("a cup", "a wall", False),
    ("a seed", "a bridge", True),
    ("a crumb", "a tree", False),
]
COMMONSENSE_ROWS = []
for light, heavy, heavy_first in COMMONSENSE_THINGS:
    first, second, answer = (heavy, light, "option1") if heavy_first else (light, heavy, "option2")
    COMMONSENSE_ROWS.append(
        {
            "instruction": f"Which is heavier?\n\nOption1: {first}\nOption2: {second}\n\n"
            "Answer format: option1/option2",
            "input": "",
            "output": f"the correct answer is {answer}",
            "answer": answer,
        }
    )


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory) -> str:
    """A folder with a tiny random LlamaForCausalLM (2 layers, hidden 32) and a 400-token BPE tokenizer
    trained on the fixtures' prompts and answers."""
    texts = [qa.format_prompt("instruction", r["question"]) + r["answer"] for r in GSM_ROWS]
    texts += [qa.format_prompt("instruction", r["instruction"]) + r["output"] for r in COMMONSENSE_ROWS]
    return save_tiny_decoder(tmp_path_factory.mktemp("decoder") / "tiny-llama", texts, vocab_size=400)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("qa-data")
    gsm = folder / "gsm8k.jsonl"
    gsm.write_text("".join(json.dumps(r) + "\n" for r in GSM_ROWS), encoding="utf-8")
    commonsense = folder / "commonsense.json"
    commonsense.write_text(json.dumps(COMMONSENSE_ROWS, indent=1), encoding="utf-8")
    no_answer = folder / "no_answer.jsonl"
    no_answer.write_text("".join(json.dumps({"question": r["question"]}) + "\n" for r in GSM_ROWS), encoding="utf-8")
    return {"gsm8k": str(gsm), "commonsense": str(commonsense), "no_answer": str(no_answer)}


FAST = [
    "--rank",
    "4",
    "--experts",
    "2",
    "--top-k",
    "1",
    "--batch-size",
    "4",
    "--max-length",
    "96",
    "--max-new-tokens",
    "16",
    "--logging-steps",
    "1",
    "--save-steps",
    "0",
    "--report-to",
    "none",
]
LAYOUTS = {
    "gsm8k": ["--answer-type", "number"],
    "commonsense": [
        "--text-column",
        "instruction",
        "--label-column",
        "answer",
        "--target-column",
        "output",
        "--answer-type",
        "choice",
    ],
}


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.parametrize("layout", ["gsm8k", "commonsense"])
def test_train_save_eval_reproduces_the_metrics(layout, tiny_decoder, data_files, tmp_path):
    from goat_lora.cli import main

    run = str(tmp_path / "run")
    assert (
        main(
            [
                "train",
                "--task",
                "qa",
                "--model",
                tiny_decoder,
                "--data",
                data_files[layout],
                *LAYOUTS[layout],
                "--epochs",
                "4",
                "--lr",
                "1e-2",
                *FAST,
                "--output",
                run,
            ]
        )
        == 0
    )
    with open(os.path.join(run, "metrics.json")) as fh:
        metrics = json.load(fh)
    assert metrics["task"] == "qa" and metrics["metric"] == "exact_match"
    assert metrics["sizes"] == {"train": 14, "validation": 2, "test": 4}
    assert 0.0 <= metrics["test_exact_match"] <= 1.0 and metrics["test_loss"] > 0
    assert "exact_match" in metrics["constant_baseline"]
    assert [e["validation_exact_match"] is not None for e in metrics["per_epoch_eval"]] == [True] * 4
    losses = [h["loss"] for h in metrics["train_loss"]]
    assert sum(losses[-3:]) < sum(losses[:3])  # it learns

    rows = read_jsonl(os.path.join(run, "predictions.jsonl"))
    assert len(rows) == 4
    assert all(set(r) == {"prompt", "generation", "extracted", "gold", "gold_extracted", "correct"} for r in rows)
    assert all(r["prompt"].startswith("### Instruction:\n") and r["prompt"].endswith("### Response:\n") for r in rows)
    assert sum(r["correct"] for r in rows) / 4 == metrics["test_exact_match"]
    if layout == "gsm8k":
        assert all(r["gold"].endswith(f"#### {r['gold_extracted']}") for r in rows)
    else:
        assert all(r["gold"] == r["gold_extracted"] and r["gold"].startswith("option") for r in rows)

    evaluated = str(tmp_path / "eval")
    assert main(["eval", "--adapter", run, "--output", evaluated]) == 0
    with open(os.path.join(evaluated, "metrics.json")) as fh:
        again = json.load(fh)
    assert again["test_exact_match"] == metrics["test_exact_match"]
    assert again["test_loss"] == pytest.approx(metrics["test_loss"], rel=1e-6)
    assert read_jsonl(os.path.join(evaluated, "predictions.jsonl")) == rows  # the same generations, word for word


def test_choice_layout_learns_the_answer_format(tiny_decoder, data_files, tmp_path):
    """Fine-tuned in full (the tiny model's adapters learn too slowly for this), the generations carry
    an option word, unlike the random model's; the saved run (method_state path) reloads to the same
    generations and exact match."""
    from goat_lora.cli import main

    run = str(tmp_path / "run")
    assert (
        main(
            [
                "train",
                "--task",
                "qa",
                "--model",
                tiny_decoder,
                "--data",
                data_files["commonsense"],
                *LAYOUTS["commonsense"],
                "--method",
                "full",
                "--lr",
                "3e-3",
                "--epochs",
                "10",
                *FAST,
                "--output",
                run,
            ]
        )
        == 0
    )
    rows = read_jsonl(os.path.join(run, "predictions.jsonl"))
    assert all(r["extracted"] in ("option1", "option2") for r in rows), [r["generation"] for r in rows]
    evaluated = str(tmp_path / "eval")
    assert main(["eval", "--adapter", run, "--output", evaluated]) == 0
    assert read_jsonl(os.path.join(evaluated, "predictions.jsonl")) == rows


# ---- the loss mask -------------------------------------------------------------------------------
def test_collator_masks_prompt_and_padding(tiny_decoder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder)
    collator = qa.QACollator(tokenizer, 96, "instruction")
    items = [{"input": {"prompt": r["question"], "target": r["answer"]}, "labels": [r["answer"]]} for r in GSM_ROWS[:2]]
    items.append({"input": {"prompt": "Short?", "target": "Yes"}, "labels": ["Yes"]})
    batch = collator(items)
    ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape[0] == 3 and (attention[2] == 0).any()  # the short row is padded
    for row, item in enumerate(items):
        n_prompt = len(tokenizer(qa.format_prompt("instruction", item["input"]["prompt"]))["input_ids"])
        n = int(attention[row].sum())
        assert (labels[row, :n_prompt] == -100).all()  # no loss on the prompt
        assert (labels[row, n:] == -100).all() and (ids[row, n:] == tokenizer.pad_token_id).all()  # nor on padding
        assert torch.equal(labels[row, n_prompt:n], ids[row, n_prompt:n])  # the target and EOS are learned
        assert ids[row, n - 1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[row, n_prompt : n - 1]) == item["input"]["target"]


def test_loss_has_no_gradient_from_prompt_tokens(tiny_decoder):
    """The model's loss on a collated batch: zero gradient at every position that predicts a prompt
    or padding token, non-zero at every position that predicts a target token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder)
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder)
    items = [
        {"input": {"prompt": r["instruction"], "target": r["output"]}, "labels": [r["answer"]]}
        for r in COMMONSENSE_ROWS[:3]
    ]
    batch = qa.QACollator(tokenizer, 256, "alpaca")(items)
    out = model(**batch)
    out.logits.retain_grad()
    out.loss.backward()
    grad = out.logits.grad.abs().sum(-1)[:, :-1]  # position t predicts token t + 1
    learned = batch["labels"][:, 1:] != -100
    assert learned.any() and (~learned).any()
    assert (grad[~learned] == 0).all()
    assert (grad[learned] > 0).all()


# ---- bad input: one line, exit 2, nothing written -------------------------------------------------
def _refused(capsys, tmp_path, argv: list[str]) -> str:
    from goat_lora.cli import main

    run = tmp_path / "run"
    try:
        code = main([*argv, "--output", str(run)])
    except SystemExit as exit_:  # argparse refuses a value outside a flag's choices by exiting
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert not os.listdir(tmp_path)  # no run folder, no .run.partial
    return err[0]


def test_missing_answer_column_is_one_line(tiny_decoder, data_files, tmp_path, capsys):
    argv = ["train", "--task", "qa", "--model", tiny_decoder, "--data", data_files["no_answer"]]
    err = _refused(capsys, tmp_path, argv)
    assert "no column 'answer' (--label-column)" in err


def test_bad_answer_type_is_one_line(tiny_decoder, data_files, tmp_path, capsys):
    err = _refused(
        capsys,
        tmp_path,
        ["train", "--task", "qa", "--model", tiny_decoder, "--data", data_files["gsm8k"], "--answer-type", "letters"],
    )
    assert "--answer-type" in err and "'letters'" in err and "'number', 'choice', 'text'" in err


def test_wrong_answer_type_for_the_gold_is_one_line(tiny_decoder, data_files, tmp_path, capsys):
    err = _refused(
        capsys,
        tmp_path,
        ["train", "--task", "qa", "--model", tiny_decoder, "--data", data_files["gsm8k"], "--answer-type", "choice"],
    )
    assert "holds no choice answer" in err and "--answer-type" in err


def test_bad_prompt_template_is_one_line(tiny_decoder, data_files, tmp_path, capsys):
    err = _refused(
        capsys,
        tmp_path,
        [
            "train",
            "--task",
            "qa",
            "--model",
            tiny_decoder,
            "--data",
            data_files["gsm8k"],
            "--prompt-template",
            "Question: ",
        ],
    )
    assert "--prompt-template 'Question: '" in err


def test_head_only_is_refused(tiny_decoder, data_files, tmp_path, capsys):
    err = _refused(
        capsys,
        tmp_path,
        [
            "train",
            "--task",
            "qa",
            "--model",
            tiny_decoder,
            "--data",
            data_files["gsm8k"],
            "--method",
            "head",
            "--answer-type",
            "number",
        ],
    )
    assert "--method head" in err and "qa" in err


# ---- the untrained reference (scripts/evaluate_base.py) -------------------------------------------
def test_evaluate_base_scores_the_untrained_model(tiny_decoder, data_files, tmp_path, capsys):
    """The base model's test evaluation, on the same seeded split a run tests on."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "evaluate_base.py")
    spec = importlib.util.spec_from_file_location("evaluate_base", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = str(tmp_path / "base")
    assert (
        script.main(
            [
                "--task",
                "qa",
                "--model",
                tiny_decoder,
                "--data",
                data_files["gsm8k"],
                "--answer-type",
                "number",
                "--max-length",
                "96",
                "--max-new-tokens",
                "8",
                "--output",
                out,
            ]
        )
        == 0
    )
    with open(os.path.join(out, "metrics.json")) as fh:
        metrics = json.load(fh)
    rows = read_jsonl(os.path.join(out, "predictions.jsonl"))
    assert metrics["num_examples"] == len(rows) == 4
    assert metrics["test_exact_match"] == sum(r["correct"] for r in rows) / 4
    assert "test_exact_match" in capsys.readouterr().out
