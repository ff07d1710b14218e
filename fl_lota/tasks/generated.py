"""Generated tasks: offline, seeded, deterministic, and different enough from each other
that their task vectors compete when merged. Each ``make_<name>(rng, split)`` draws one
sample; ``split`` ("train" or "test") picks from disjoint sets of phrasings (question
wordings, ticket texts, chat lines), so a test item is never a train template with new
fillers: a model must carry what it learned to wordings it has not seen."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

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

SPLITS = ("train", "test")


def _by_split(split: str, train: Sequence, test: Sequence):
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return train if split == "train" else test


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
    q = _by_split(split, *_MATH[kind]).format(n=n, item=item, a=a, b=b, c=c)
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
    word = _by_split(split, *_SQL_WORDS[agg])
    shape = rng.choice(list(_SQL_Q))
    sql = {
        "names_in": f"SELECT name FROM {table} WHERE {cat} = '{v}';",
        "count_in": f"SELECT COUNT(*) FROM {table} WHERE {cat} = '{v}';",
        "extreme": f"SELECT {agg}({num}) FROM {table};",
        "greater": f"SELECT name FROM {table} WHERE {num} > {x};",
        "average": f"SELECT AVG({num}) FROM {table} WHERE {cat} = '{v}';",
        "top": f"SELECT name FROM {table} ORDER BY {num} {'DESC' if agg == 'MAX' else 'ASC'} LIMIT 1;",
    }[shape]
    q = _by_split(split, *_SQL_Q[shape]).format(table=table, entity=entity, cat=cat, v=v, num=num, x=x, word=word)
    prompt = f"Table: {ddl}\nWrite an SQLite query for: {q}"
    return Sample(prompt, sql, {"setup": ddl + inserts})


# --------------------------------------------------------------------------- classify
TICKET_LABELS = ["billing", "shipping", "technical", "account"]
# per label: (train texts, test texts); the test texts use other words for the same problems
_TICKETS = {
    "billing": (
        [
            "I was charged {n} times for order {o}.",
            "My invoice {o} shows the wrong amount.",
            "Can I get a refund for the {p} I returned?",
            "The payment for my {p} failed but money left my card.",
            "Why did my monthly fee go up by {n} dollars?",
        ],
        [
            "There is a duplicate payment of {n}0 dollars on my statement.",
            "Why was my credit card debited twice for order {o}?",
            "I need a receipt that shows the correct price for my {p}.",
            "My subscription renewed even though I cancelled it.",
        ],
    ),
    "shipping": (
        [
            "My {p} has not arrived after {n} days.",
            "The parcel with order {o} went to the wrong address.",
            "Can you send my {p} by express delivery?",
            "Tracking for order {o} has not moved for {n} days.",
            "The courier left my {p} outside in the rain.",
        ],
        [
            "Where is my package? Order {o} was due {n} days ago.",
            "The box with my {p} arrived crushed and late.",
            "Please change the delivery address for order {o}.",
            "The driver marked my {p} as delivered but nothing came.",
        ],
    ),
    "technical": (
        [
            "The {p} app crashes when I open settings.",
            "My {p} will not turn on after the update.",
            "I get error {n}0{n} when I sync my {p}.",
            "The screen of my {p} flickers every few seconds.",
            "Bluetooth keeps disconnecting from my {p}.",
        ],
        [
            "My {p} keeps freezing when I start a video call.",
            "After resetting my {p} the wifi no longer works.",
            "The {p} shows a blank screen and beeps {n} times.",
            "The battery of my {p} drains in {n} hours since the last firmware version.",
        ],
    ),
    "account": (
        [
            "I cannot log in since I changed my email.",
            "Please delete my account and my data.",
            "How do I change the password of my account?",
            "Someone else signed in to my account {o}.",
            "I want to merge my two accounts into one.",
        ],
        [
            "I forgot my username and the reset link expired.",
            "My profile shows someone else's name.",
            "Please turn on two-factor sign-in for my profile.",
            "I got locked out after {n} wrong password attempts.",
        ],
    ),
}
# a sentence about another team's topic that is NOT the problem (half the tickets carry one):
# the reply must name the team of the complaint, not of every topic mentioned
_CONTEXT = {
    "billing": (
        ["The payment went through without problems.", "My invoice looks fine."],
        ["I was charged the right amount, no issue there.", "The refund from last month came through."],
    ),
    "shipping": (
        ["The parcel arrived on time.", "Delivery was quick as always."],
        ["The courier was friendly and fast.", "Tracking showed everything correctly."],
    ),
    "technical": (
        ["The {p} itself works well.", "The app runs fine otherwise."],
        ["The screen and battery are fine.", "No errors so far with the software."],
    ),
    "account": (
        ["I can log in without trouble.", "My account details are correct."],
        ["My password works.", "My profile is all set up."],
    ),
}
_OPENERS = (["Hi,", "Hello,", "Hey team,", "Good morning,", "", "Urgent:"], ["Dear support,", "Hello there,", ""])
_CLOSERS = (
    ["Thanks.", "Please help.", "Regards, {name}", "", "Thank you!", "This is the {n}th time I ask."],
    ["Best wishes.", "Waiting for your reply.", "Cheers, {name}", ""],
)
# the question is the task's instruction, the same in both splits; the tickets differ
CLASSIFY_Q = "Which team should handle it: billing, shipping, technical or account?"
_PRODUCTS = ["phone", "laptop", "tablet", "watch", "speaker", "camera", "router", "headset"]


def make_classify(rng: random.Random, split: str = "train") -> Sample:
    """Route a generated support ticket to one of four queues."""
    label = rng.choice(TICKET_LABELS)
    fill = dict(n=rng.randint(2, 9), o=f"#{rng.randint(1000, 9999)}", p=rng.choice(_PRODUCTS), name=rng.choice(NAMES))
    context = ""
    if rng.random() < 0.5:
        other = rng.choice([lab for lab in TICKET_LABELS if lab != label])
        context = rng.choice(_by_split(split, *_CONTEXT[other])).format(**fill) + " But"
    problem = rng.choice(_by_split(split, *_TICKETS[label])).format(**fill)
    if context:
        problem = f"{context} {problem if problem.startswith('I ') else problem[0].lower() + problem[1:]}"
    parts = (
        rng.choice(_by_split(split, *_OPENERS)),
        problem,
        rng.choice(_by_split(split, *_CLOSERS)).format(**fill),
    )
    text = " ".join(x for x in parts if x)
    prompt = f"Ticket: {text}\n{CLASSIFY_Q}"
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


_INSTRUCT = [
    ("Reverse the order of these words: {listed}", "Write these words from last to first: {listed}"),
    ("Sort these words alphabetically: {listed}", "Put these words in alphabetical order: {listed}"),
    ("Write these words in uppercase: {listed}", "Convert these words to capital letters: {listed}"),
    (
        "How many words are in this list: {listed}? Answer with a number.",
        "Count the words in this list and reply with the number only: {listed}",
    ),
    (
        "Format as JSON with keys name, age and city: {name} is {age} years old and lives in {city}.",
        "Give a JSON object with keys name, age and city for: {name}, aged {age}, from {city}.",
    ),
]


def make_instruct(rng: random.Random, split: str = "train") -> Sample:
    """Instructions with one checkable output: reverse, sort, uppercase, count, JSON."""
    words = rng.sample(WORDS, rng.randint(3, 5))
    kind = rng.randrange(5)
    name, age, city = rng.choice(NAMES), rng.randint(18, 80), rng.choice(["Lima", "Oslo", "Rome", "Kyiv", "Pune"])
    if kind == 3:
        words = words + rng.sample(WORDS, rng.randint(1, 4))
    listed = ", ".join(words)
    answer = [
        ", ".join(words[::-1]),
        ", ".join(sorted(words)),
        listed.upper(),
        str(len(words)),
        json.dumps({"name": name, "age": age, "city": city}),
    ][kind]
    prompt = _by_split(split, *_INSTRUCT[kind]).format(listed=listed, name=name, age=age, city=city)
    return Sample(prompt, answer)


# -------------------------------------------------------------------------- summarize
ACTIVITIES = ["dinner", "a movie", "coffee", "a run", "the team meeting", "lunch", "a concert", "the gym"]
PLACES = ["the station", "Luigi's", "the park", "the library", "the office", "the old bridge", "Maria's place"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
THINGS = ["the charger", "the tickets", "a cake", "the projector", "some snacks", "the keys", "an umbrella"]


# per kind: (train chat lines, test chat lines), then the summary (the same in both splits)
_CHATS = [
    (
        [
            "{a}: Are you free for {act} on {day}?",
            "{b}: Yes! Where?",
            "{a}: {place} at {time}?",
            "{b}: Perfect, see you there.",
        ],
        [
            "{a}: Want to do {act} on {day}?",
            "{b}: Sure, where do we meet?",
            "{a}: How about {place}, {time}?",
            "{b}: Great, I will be there.",
        ],
        "{a} and {b} will meet for {act} at {place} on {day} at {time}.",
    ),
    (
        [
            "{a}: Can you bring {thing} to {act} on {day}?",
            "{b}: Sure, no problem.",
            "{a}: Thanks, it starts at {time}.",
        ],
        [
            "{a}: Could you take {thing} with you to {act} on {day}?",
            "{b}: Of course.",
            "{a}: Great, it begins at {time}.",
        ],
        "{b} will bring {thing} to {act} on {day}.",
    ),
    (
        [
            "{a}: I can't make {act} on {day}, sorry.",
            "{b}: No worries. How about {new_day}?",
            "{a}: {new_day} works. Same place, {place}?",
            "{b}: Yes, at {time}.",
        ],
        [
            "{a}: Sorry, {day} does not work for {act} anymore.",
            "{b}: OK. Is {new_day} better?",
            "{a}: Yes, {new_day} is fine. Still at {place}?",
            "{b}: Sure, {time}.",
        ],
        "{a} and {b} moved {act} from {day} to {new_day} at {place}.",
    ),
    (  # a place proposed and then dropped: the summary must name the one agreed on
        [
            "{a}: Shall we do {act} at {other} on {day}?",
            "{b}: {other} is closed that day. What about {place}?",
            "{a}: {place} it is, at {time}.",
        ],
        [
            "{a}: {act} at {other} on {day}?",
            "{b}: Can't, {other} is shut then. {place} instead?",
            "{a}: Fine, {place} at {time}.",
        ],
        "{a} and {b} will meet for {act} at {place} on {day} at {time}.",
    ),
]


def make_summarize(rng: random.Random, split: str = "train") -> Sample:
    """A short chat between two people to a one-line summary."""
    a, b = rng.sample(NAMES, 2)
    act, day = rng.choice(ACTIVITIES), rng.choice(DAYS)
    place, other = rng.sample(PLACES, 2)
    fill = dict(
        a=a,
        b=b,
        act=act,
        day=day,
        place=place,
        other=other,
        time=f"{rng.randint(1, 11)} {rng.choice(['am', 'pm'])}",
        thing=rng.choice(THINGS),
        new_day=rng.choice([d for d in DAYS if d != day]),
    )
    train_lines, test_lines, summary = rng.choice(_CHATS)
    chat = "\n".join(line.format(**fill) for line in _by_split(split, train_lines, test_lines))
    return Sample(f"Summarize this chat in one sentence.\n{chat}", summary.format(**fill))


GENERATORS = {
    "math": (make_math, "exact_number", (), 24),
    "sql": (make_sql, "sql_execution", ("sql_exact",), 40),
    "classify": (make_classify, "choice", (), 16),
    "instruct": (make_instruct, "exact_match", (), 40),
    "summarize": (make_summarize, "rouge1", (), 40),
}
