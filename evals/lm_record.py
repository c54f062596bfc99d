"""ReCoRD functions for lm-evaluation-harness task configs, usable with transformers 5.

lm-eval's own ``super_glue/record/util.py`` imports ``transformers.data.metrics.squad_metrics``,
which transformers 5 removed, so the built-in ``record`` task cannot load there. These functions
mirror that file (same prompt, same choices, same per-example scoring: the most likely entity,
SQuAD-style token F1 and exact match against the best-matching gold answer); the F1/EM code is the
official SQuAD v1.1/v2.0 normalisation. ``evals.superglue`` points its ReCoRD task config here only
when the harness's file cannot be imported.
"""

from __future__ import annotations

import collections
import re
import string

import numpy as np


def doc_to_text(doc):
    initial_text, *highlights = doc["passage"].strip().split("\n@highlight\n")
    text = initial_text + "\n\n"
    for highlight in highlights:
        text += f"  - {highlight}.\n"
    return text


def format_answer(query, entity):
    return f"  - {query}".replace("@placeholder", entity)


def doc_to_target(doc):
    # only the first correct entity is the target, as in lm-eval
    return format_answer(query=doc["query"], entity=doc["answers"][0])


def doc_to_choice(doc):
    return [format_answer(query=doc["query"], entity=ans) for ans in doc["entities"]]


def process_docs(dataset):
    def _process_doc(doc):
        return {
            "passage": doc["passage"],
            "query": doc["query"],
            "entities": sorted(set(doc["entities"])),
            "answers": sorted(set(doc["answers"])),
        }

    return dataset.map(_process_doc)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (SQuAD)."""

    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text, flags=re.UNICODE)

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return " ".join(remove_articles(remove_punc(s.lower())).split())


def compute_exact(a_gold: str, a_pred: str) -> int:
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    gold_toks = normalize_answer(a_gold).split()
    pred_toks = normalize_answer(a_pred).split()
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        # if either is no-answer, F1 is 1 if they agree, 0 otherwise
        return float(gold_toks == pred_toks)
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def _max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(gt, prediction) for gt in ground_truths)


def process_results(doc, results):
    # the most likely entity is the prediction; F1 and EM per example, averaged by the harness
    max_idx = int(np.argmax(np.array([result[0] for result in results])))
    prediction = doc["entities"][max_idx]
    gold = doc["answers"]
    return {
        "f1": _max_over_ground_truths(compute_f1, prediction, gold),
        "em": _max_over_ground_truths(compute_exact, prediction, gold),
    }
