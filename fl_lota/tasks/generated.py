"""Generated tasks: offline, seeded, deterministic, and different enough from each other
that their task vectors compete when merged. Each ``make_<name>(rng, split)`` draws one
sample; ``split`` ("train" or "test") picks from disjoint sets of phrasings (question
wordings, ticket texts, chat lines), so a test item is never a train template with new
fillers: a model must carry what it learned to wordings it has not seen."""

from __future__ import annotations

import random

from fl_lota.tasks.base import NAMES, Sample, by_split
from fl_lota.tasks.generated_text import make_classify, make_instruct, make_summarize

# ------------------------------------------------------------------------------- math
ITEMS = ["apples", "books", "marbles", "stickers", "coins", "pencils", "cookies", "cards", "stamps", "shells"]


# per kind: (train wording, test wording); fields n, item, a, b, c
_MATH = [
    (
        "{n} has {a} {item}. {n} gets {b} more. How many {item} does {n} have now?",
        "There are {a} {item} in {n}'s bag. A friend adds {b}. What is the total number of {item} now?",
    ),
    (
        "{n} has {a} {item} and gives {b} of them to a friend. How many {item} are left?",
        "{n} started with {a} {item}, then lost {b}. How many {item} remain?",
    ),
    (
        "{n} buys {a} boxes with {b} {item} in each box. How many {item} does {n} buy?",
        "Each of {a} bags holds {b} {item}. How many {item} are there in all the bags?",
    ),
    (
        "{n} has {a} {item}, buys {b} more and then gives away {c}. How many {item} does {n} have now?",
        "{n} owned {a} {item}. After getting {b} as a gift, {n} sold {c}. How many {item} does {n} own now?",
    ),
    (
        "{n} buys {a} packs of {b} {item} and already had {c}. How many {item} does {n} have in total?",
        "{n} had {c} {item} and then received {a} packs with {b} {item} each. How many {item} does {n} have "
        "altogether?",
    ),
]


def make_math(rng: random.Random, split: str = "train") -> Sample:
    """Arithmetic word problems with one or two operations. The answer is the equation,
    then its result (as gsm8k's worked solutions end in the number); the metric reads the
    final number."""
    n, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(5)
    c = 0
    if kind == 0:
        a, b = rng.randint(3, 30), rng.randint(2, 20)
        expr, ans = f"{a} + {b}", a + b
    elif kind == 1:
        a = rng.randint(10, 40)
        b = rng.randint(2, a - 1)
        expr, ans = f"{a} - {b}", a - b
    elif kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        expr, ans = f"{a} * {b}", a * b
    elif kind == 3:
        a, b = rng.randint(5, 20), rng.randint(2, 10)
        c = rng.randint(1, a + b - 1)
        expr, ans = f"{a} + {b} - {c}", a + b - c
    else:
        a, b, c = rng.randint(2, 5), rng.randint(2, 9), rng.randint(1, 10)
        expr, ans = f"{a} * {b} + {c}", a * b + c
    q = by_split(split, *_MATH[kind]).format(n=n, item=item, a=a, b=b, c=c)
    return Sample(q, f"{expr} = {ans}", {"number": ans})


# -------------------------------------------------------------------------------- sql
SQL_DOMAINS = [
    # table, entity, category column and values, numeric columns with ranges, names
    (
        "employees",
        "employee",
        "department",
        ["Sales", "Engineering", "Marketing", "Support"],
        [("salary", 30000, 90000), ("age", 21, 64)],
        NAMES,
    ),
    (
        "products",
        "product",
        "category",
        ["toys", "books", "garden", "kitchen"],
        [("price", 3, 300), ("stock", 0, 500)],
        [
            "lamp",
            "kettle",
            "robot",
            "puzzle",
            "novel",
            "rake",
            "bowl",
            "kite",
            "drone",
            "atlas",
            "spade",
            "mug",
            "clock",
            "blocks",
        ],
    ),
    (
        "students",
        "student",
        "major",
        ["math", "biology", "history", "physics"],
        [("grade", 50, 100), ("year", 1, 4)],
        NAMES,
    ),
    (
        "cities",
        "city",
        "country",
        ["Spain", "Japan", "Brazil", "Canada"],
        [("population", 10000, 900000), ("area", 20, 900)],
        ["Alora", "Benti", "Corvo", "Dunas", "Elmar", "Fiora", "Gavia", "Horta", "Iruna", "Jaca", "Kobe", "Lumo"],
    ),
]


# per question shape: (train wording, test wording)
_SQL_Q = {
    "names_in": (
        "List the names of {table} whose {cat} is {v}.",
        "Which {table} belong to the {v} {cat}? Return their names.",
    ),
    "count_in": ("How many {table} have {cat} {v}?", "Count the {table} in {cat} {v}."),
    "extreme": ("What is the {word} {num} of all {table}?", "Find the {word} value of {num} among the {table}."),
    "greater": (
        "List the names of {table} with {num} greater than {x}.",
        "Show the names of the {table} whose {num} exceeds {x}.",
    ),
    "average": (
        "What is the average {num} of {table} with {cat} {v}?",
        "Compute the mean {num} for {table} where {cat} equals {v}.",
    ),
    "top": ("Which {entity} has the {word} {num}?", "Name the {entity} with the {word} {num}."),
}
_SQL_WORDS = {"MAX": ("highest", "largest"), "MIN": ("lowest", "smallest")}


def make_sql(rng: random.Random, split: str = "train") -> Sample:
    """Text-to-SQL over a generated table with 10 generated rows (kept for execution match).
    Filters name values the rows hold and thresholds below the column's maximum, so the
    reference query never returns nothing (an empty result would match many wrong queries)."""
    table, entity, cat, cats, nums, names = rng.choice(SQL_DOMAINS)
    (n1, lo1, hi1), (n2, lo2, hi2) = nums
    cols = [("id", "INTEGER"), ("name", "TEXT"), (cat, "TEXT"), (n1, "INTEGER"), (n2, "INTEGER")]
    ddl = f"CREATE TABLE {table} ({', '.join(f'{c} {t}' for c, t in cols)});"
    rows = []
    for i, name in enumerate(rng.sample(names, 10)):
        rows.append((i + 1, name, rng.choice(cats), rng.randint(lo1, hi1), rng.randint(lo2, hi2)))
    inserts = "".join(f"INSERT INTO {table} VALUES ({r[0]}, '{r[1]}', '{r[2]}', {r[3]}, {r[4]});" for r in rows)
    v = rng.choice(sorted({r[2] for r in rows}))
    col = rng.randrange(2)
    num = (n1, n2)[col]
    values = sorted(r[3 + col] for r in rows)
    x = rng.randint(values[0], values[-1] - 1) if values[-1] > values[0] else values[0] - 1
    agg = rng.choice(["MAX", "MIN"])
    word = by_split(split, *_SQL_WORDS[agg])
    shape = rng.choice(list(_SQL_Q))
    sql = {
        "names_in": f"SELECT name FROM {table} WHERE {cat} = '{v}';",
        "count_in": f"SELECT COUNT(*) FROM {table} WHERE {cat} = '{v}';",
        "extreme": f"SELECT {agg}({num}) FROM {table};",
        "greater": f"SELECT name FROM {table} WHERE {num} > {x};",
        "average": f"SELECT AVG({num}) FROM {table} WHERE {cat} = '{v}';",
        "top": f"SELECT name FROM {table} ORDER BY {num} {'DESC' if agg == 'MAX' else 'ASC'} LIMIT 1;",
    }[shape]
    q = by_split(split, *_SQL_Q[shape]).format(table=table, entity=entity, cat=cat, v=v, num=num, x=x, word=word)
    prompt = f"Table: {ddl}\nWrite an SQLite query for: {q}"
    return Sample(prompt, sql, {"setup": ddl + inserts})


GENERATORS = {
    "math": (make_math, "exact_number", (), 24),
    "sql": (make_sql, "sql_execution", ("sql_exact",), 40),
    "classify": (make_classify, "choice", (), 16),
    "instruct": (make_instruct, "exact_match", (), 40),
    "summarize": (make_summarize, "rouge1", (), 40),
}
