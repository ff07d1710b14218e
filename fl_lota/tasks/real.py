"""Loaders for the paper's real datasets, through ``datasets``: a hub name or local files.

Each converter recognises the columns of the hub release and of the LLM-Adapters
instruction/answer release (the format in ``../shared/data``).
"""

from __future__ import annotations

from pathlib import Path

from fl_lota.tasks.base import Sample

ARC_LABELS = ["answer1", "answer2", "answer3", "answer4", "answer5"]

# name -> (default hub id, hub config, train split, test split)
HUB = {
    "gsm8k": ("openai/gsm8k", "main", "train", "test"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "train", "test"),
    "boolq": ("google/boolq", None, "train", "validation"),
    "sql_create_context": ("b-mc2/sql-create-context", None, "train", None),
    "samsum": ("knkarthick/samsum", None, "train", "test"),
}


def load_rows(name: str, source: str | None, split: str) -> list[dict]:
    """Rows of ``split`` ("train"/"test") from a local folder (``<split>.json[l]`` /
    ``.csv`` / ``.parquet``), a local file, or the hub."""
    from datasets import load_dataset

    hub_id, config, train_split, test_split = HUB[name]
    if source is not None and Path(source).exists():
        p = Path(source)
        if p.is_dir():
            files = [f for ext in ("jsonl", "json", "csv", "parquet") for f in [p / f"{split}.{ext}"] if f.is_file()]
            if not files:
                raise FileNotFoundError(f"{p} holds no {split}.jsonl/.json/.csv/.parquet for {name}")
            p = files[0]
        fmt = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(p.suffix.lstrip("."))
        if fmt is None:
            raise ValueError(f"{p}: unsupported file type (use .jsonl, .json, .csv or .parquet)")
        return list(load_dataset(fmt, data_files=str(p), split="train"))
    hub_split = train_split if split == "train" else test_split
    if hub_split is None:
        raise ValueError(f"{name} has no {split} split on the hub; pass local files")
    try:
        return list(load_dataset(source or hub_id, config, split=hub_split))
    except Exception as e:  # network, missing cache: say what was tried
        first = str(e).splitlines()[0] if str(e) else ""
        raise FileNotFoundError(
            f"cannot load {name} from {source or hub_id!r} ({type(e).__name__}: {first}); pass a local folder or file"
        ) from None


def gsm8k(row: dict) -> Sample:
    ans = row["answer"]
    number = ans.split("####")[-1].strip().replace(",", "")
    return Sample(row["question"], ans, {"number": float(number)})


def arc(row: dict) -> Sample:
    if "instruction" in row:  # LLM-Adapters: answer1..answer4
        return Sample(
            row["instruction"], row.get("output") or row["answer"], {"choices": ARC_LABELS, "label": row["answer"]}
        )
    labels = row["choices"]["label"]
    options = "\n".join(f"Answer{i + 1}: {t}" for i, t in enumerate(row["choices"]["text"]))
    gold = f"answer{labels.index(row['answerKey']) + 1}"
    prompt = (
        f"Please choose the correct answer to the question: {row['question']}\n\n{options}"
        "\n\nAnswer format: answer1/answer2/answer3/answer4"
    )
    return Sample(prompt, f"the correct answer is {gold}", {"choices": ARC_LABELS[: len(labels)], "label": gold})


def boolq(row: dict) -> Sample:
    if "instruction" in row:
        return Sample(
            row["instruction"],
            row.get("output") or row["answer"],
            {"choices": ["true", "false"], "label": row["answer"]},
        )
    gold = "true" if row["answer"] else "false"
    prompt = (
        f"{row['passage']}\nPlease answer the following question with true or false, question: {row['question']}?"
        "\n\nAnswer format: true/false"
    )
    return Sample(prompt, f"the correct answer is {gold}", {"choices": ["true", "false"], "label": gold})


def sql_create_context(row: dict) -> Sample:
    prompt = f"Table: {row['context']}\nWrite an SQLite query for: {row['question']}"
    return Sample(prompt, row["answer"], {"setup": row["context"]})


def samsum(row: dict) -> Sample:
    return Sample(f"Summarize this chat in one sentence.\n{row['dialogue']}", row["summary"])


CONVERTERS = {
    "gsm8k": (gsm8k, "exact_number", (), 256),
    "arc_easy": (arc, "choice", (), 16),
    "boolq": (boolq, "choice", (), 16),
    # its contexts are CREATE statements only: no rows to compare query results on
    "sql_create_context": (sql_create_context, "sql_exact", (), 64),
    "samsum": (samsum, "rouge1", (), 64),
}
