"""Generated tasks: offline, seeded, deterministic, and different enough from each other
that their task vectors compete when merged. Each ``make_<name>(rng)`` draws one sample."""

from __future__ import annotations

import json
import random

from .base import Sample

NAMES = [
    "Anna",
    "Ben",
    "Carla",
    "David",
    "Elena",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jamal",
    "Kira",
    "Liam",
    "Maya",
    "Noah",
    "Olga",
    "Pedro",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
    "Umar",
    "Vera",
    "Wes",
    "Yuki",
]

# ------------------------------------------------------------------------------- math
ITEMS = ["apples", "books", "marbles", "stickers", "coins", "pencils", "cookies", "cards", "stamps", "shells"]


def make_math(rng: random.Random) -> Sample:
    """Arithmetic word problems with one or two operations. The answer is the equation,
    then its result (as gsm8k's worked solutions end in the number); the metric reads the
    final number."""
    n, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(3, 30), rng.randint(2, 20)
        q, expr = f"{n} has {a} {item}. {n} gets {b} more. How many {item} does {n} have now?", f"{a} + {b}"
        ans = a + b
    elif kind == 1:
        a = rng.randint(10, 40)
        b = rng.randint(2, a - 1)
        q, expr = f"{n} has {a} {item} and gives {b} of them to a friend. How many {item} are left?", f"{a} - {b}"
        ans = a - b
    elif kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q, expr = f"{n} buys {a} boxes with {b} {item} in each box. How many {item} does {n} buy?", f"{a} * {b}"
        ans = a * b
    elif kind == 3:
        a, b = rng.randint(5, 20), rng.randint(2, 10)
        c = rng.randint(1, a + b - 1)
        q = f"{n} has {a} {item}, buys {b} more and then gives away {c}. How many {item} does {n} have now?"
        expr, ans = f"{a} + {b} - {c}", a + b - c
    else:
        a, b, c = rng.randint(2, 5), rng.randint(2, 9), rng.randint(1, 10)
        q = f"{n} buys {a} packs of {b} {item} and already had {c}. How many {item} does {n} have in total?"
        expr, ans = f"{a} * {b} + {c}", a * b + c
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


def make_sql(rng: random.Random) -> Sample:
    """Text-to-SQL over a generated table with 10 generated rows (kept for execution match)."""
    table, entity, cat, cats, nums, names = rng.choice(SQL_DOMAINS)
    (n1, lo1, hi1), (n2, lo2, hi2) = nums
    cols = [("id", "INTEGER"), ("name", "TEXT"), (cat, "TEXT"), (n1, "INTEGER"), (n2, "INTEGER")]
    ddl = f"CREATE TABLE {table} ({', '.join(f'{c} {t}' for c, t in cols)});"
    rows = []
    for i, name in enumerate(rng.sample(names, 10)):
        rows.append((i + 1, name, rng.choice(cats), rng.randint(lo1, hi1), rng.randint(lo2, hi2)))
    inserts = "".join(f"INSERT INTO {table} VALUES ({r[0]}, '{r[1]}', '{r[2]}', {r[3]}, {r[4]});" for r in rows)
    v = rng.choice(cats)
    num = rng.choice([n1, n2])
    lo, hi = (lo1, hi1) if num == n1 else (lo2, hi2)
    x = rng.randint(lo, hi)
    kind = rng.randrange(6)
    if kind == 0:
        q, sql = f"List the names of {table} whose {cat} is {v}.", f"SELECT name FROM {table} WHERE {cat} = '{v}';"
    elif kind == 1:
        q, sql = f"How many {table} have {cat} {v}?", f"SELECT COUNT(*) FROM {table} WHERE {cat} = '{v}';"
    elif kind == 2:
        agg, word = rng.choice([("MAX", "highest"), ("MIN", "lowest")])
        q, sql = f"What is the {word} {num} of all {table}?", f"SELECT {agg}({num}) FROM {table};"
    elif kind == 3:
        q, sql = (
            f"List the names of {table} with {num} greater than {x}.",
            f"SELECT name FROM {table} WHERE {num} > {x};",
        )
    elif kind == 4:
        q = f"What is the average {num} of {table} with {cat} {v}?"
        sql = f"SELECT AVG({num}) FROM {table} WHERE {cat} = '{v}';"
    else:
        order, word = rng.choice([("DESC", "highest"), ("ASC", "lowest")])
        q = f"Which {entity} has the {word} {num}?"
        sql = f"SELECT name FROM {table} ORDER BY {num} {order} LIMIT 1;"
    prompt = f"Table: {ddl}\nWrite an SQLite query for: {q}"
    return Sample(prompt, sql, {"setup": ddl + inserts})


# --------------------------------------------------------------------------- classify
TICKET_LABELS = ["billing", "shipping", "technical", "account"]
_TICKETS = {
    "billing": [
        "I was charged {n} times for order {o}.",
        "My invoice {o} shows the wrong amount.",
        "Can I get a refund for the {p} I returned?",
        "The payment for my {p} failed but money left my card.",
        "Why did my monthly fee go up by {n} dollars?",
    ],
    "shipping": [
        "My {p} has not arrived after {n} days.",
        "The parcel with order {o} went to the wrong address.",
        "Can you send my {p} by express delivery?",
        "Tracking for order {o} has not moved for {n} days.",
        "The courier left my {p} outside in the rain.",
    ],
    "technical": [
        "The {p} app crashes when I open settings.",
        "My {p} will not turn on after the update.",
        "I get error {n}0{n} when I sync my {p}.",
        "The screen of my {p} flickers every few seconds.",
        "Bluetooth keeps disconnecting from my {p}.",
    ],
    "account": [
        "I cannot log in since I changed my email.",
        "Please delete my account and my data.",
        "How do I change the password of my account?",
        "Someone else signed in to my account {o}.",
        "I want to merge my two accounts into one.",
    ],
}
_OPENERS = ["Hi,", "Hello,", "Hey team,", "Good morning,", "", "Urgent:"]
_CLOSERS = ["Thanks.", "Please help.", "Regards, {name}", "", "Thank you!", "This is the {n}th time I ask."]
_PRODUCTS = ["phone", "laptop", "tablet", "watch", "speaker", "camera", "router", "headset"]


def make_classify(rng: random.Random) -> Sample:
    """Route a generated support ticket to one of four queues."""
    label = rng.choice(TICKET_LABELS)
    fill = dict(n=rng.randint(2, 9), o=f"#{rng.randint(1000, 9999)}", p=rng.choice(_PRODUCTS), name=rng.choice(NAMES))
    text = " ".join(
        x
        for x in (rng.choice(_OPENERS), rng.choice(_TICKETS[label]).format(**fill), rng.choice(_CLOSERS).format(**fill))
        if x
    )
    prompt = f"Ticket: {text}\nWhich team should handle it: billing, shipping, technical or account?"
    return Sample(prompt, label, {"choices": TICKET_LABELS, "label": label})


# --------------------------------------------------------------------------- instruct
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "piano",
    "lemon",
    "candle",
    "forest",
    "mirror",
    "rocket",
    "garden",
    "silver",
    "window",
    "pepper",
    "island",
    "bottle",
    "jacket",
    "violin",
    "meadow",
]


def make_instruct(rng: random.Random) -> Sample:
    """Instructions with one checkable output: reverse, sort, uppercase, count, JSON."""
    words = rng.sample(WORDS, rng.randint(3, 5))
    listed = ", ".join(words)
    kind = rng.randrange(5)
    if kind == 0:
        return Sample(f"Reverse the order of these words: {listed}", ", ".join(words[::-1]))
    if kind == 1:
        return Sample(f"Sort these words alphabetically: {listed}", ", ".join(sorted(words)))
    if kind == 2:
        return Sample(f"Write these words in uppercase: {listed}", listed.upper())
    if kind == 3:
        extra = rng.sample(WORDS, rng.randint(1, 4))
        listed = ", ".join(words + extra)
        return Sample(f"How many words are in this list: {listed}? Answer with a number.", str(len(words + extra)))
    name, age, city = rng.choice(NAMES), rng.randint(18, 80), rng.choice(["Lima", "Oslo", "Rome", "Kyiv", "Pune"])
    return Sample(
        f"Format as JSON with keys name, age and city: {name} is {age} years old and lives in {city}.",
        json.dumps({"name": name, "age": age, "city": city}),
    )


# -------------------------------------------------------------------------- summarize
ACTIVITIES = ["dinner", "a movie", "coffee", "a run", "the team meeting", "lunch", "a concert", "the gym"]
PLACES = ["the station", "Luigi's", "the park", "the library", "the office", "the old bridge", "Maria's place"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
THINGS = ["the charger", "the tickets", "a cake", "the projector", "some snacks", "the keys", "an umbrella"]


def make_summarize(rng: random.Random) -> Sample:
    """A short chat between two people to a one-line summary."""
    a, b = rng.sample(NAMES, 2)
    act, place, day = rng.choice(ACTIVITIES), rng.choice(PLACES), rng.choice(DAYS)
    time = f"{rng.randint(1, 11)} {rng.choice(['am', 'pm'])}"
    kind = rng.randrange(3)
    if kind == 0:
        chat = [
            f"{a}: Are you free for {act} on {day}?",
            f"{b}: Yes! Where?",
            f"{a}: {place} at {time}?",
            f"{b}: Perfect, see you there.",
        ]
        summary = f"{a} and {b} will meet for {act} at {place} on {day} at {time}."
    elif kind == 1:
        thing = rng.choice(THINGS)
        chat = [
            f"{a}: Can you bring {thing} to {act} on {day}?",
            f"{b}: Sure, no problem.",
            f"{a}: Thanks, it starts at {time}.",
        ]
        summary = f"{b} will bring {thing} to {act} on {day}."
    else:
        new_day = rng.choice([d for d in DAYS if d != day])
        chat = [
            f"{a}: I can't make {act} on {day}, sorry.",
            f"{b}: No worries. How about {new_day}?",
            f"{a}: {new_day} works. Same place, {place}?",
            f"{b}: Yes, at {time}.",
        ]
        summary = f"{a} and {b} moved {act} from {day} to {new_day} at {place}."
    dialogue = "\n".join(chat)
    return Sample(f"Summarize this chat in one sentence.\n{dialogue}", summary)


GENERATORS = {
    "math": (make_math, "exact_number", (), 24),
    "sql": (make_sql, "sql_execution", ("sql_exact",), 40),
    "classify": (make_classify, "choice", (), 16),
    "instruct": (make_instruct, "exact_match", (), 40),
    "summarize": (make_summarize, "rouge1", (), 40),
}
