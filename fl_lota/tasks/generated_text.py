"""Generated tasks in prose: ``classify`` (route a support ticket), ``instruct`` (small text
operations) and ``summarize`` (a two-person chat to one line). As in
``fl_lota.tasks.generated``, ``split`` picks from disjoint train and test phrasings."""

from __future__ import annotations

import json
import random

from fl_lota.tasks.base import NAMES, Sample, by_split

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
        context = rng.choice(by_split(split, *_CONTEXT[other])).format(**fill) + " But"
    problem = rng.choice(by_split(split, *_TICKETS[label])).format(**fill)
    if context:
        problem = f"{context} {problem if problem.startswith('I ') else problem[0].lower() + problem[1:]}"
    parts = (
        rng.choice(by_split(split, *_OPENERS)),
        problem,
        rng.choice(by_split(split, *_CLOSERS)).format(**fill),
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
    prompt = by_split(split, *_INSTRUCT[kind]).format(listed=listed, name=name, age=age, city=city)
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
    chat = "\n".join(line.format(**fill) for line in by_split(split, train_lines, test_lines))
    return Sample(f"Summarize this chat in one sentence.\n{chat}", summary.format(**fill))
