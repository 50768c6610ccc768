"""Seeded generator for the built-in demo tasks (all examples synthetic, made here).

- ticket: a customer-support message -> billing | shipping | account | bug
- contact: a sentence about a person -> {"name": ..., "age": N, "city": ...}
- isodate: a date written for people ("the 5th of March 2021") -> 2021-03-05

Each task gets `<task>.train.jsonl` (400 rows) and `<task>.eval.jsonl` (48 rows). No text
appears in both splits, and contact and isodate eval targets are unseen in train too, so eval
measures the skill, not recall; the slot vocabularies (names, cities, months) are shared.
The files under data/ are this module's output for seed 0 (tests/test_demo_data.py checks):

    python -m mtft.train.demo.generate [--out DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable
from datetime import date, timedelta
from functools import partial
from pathlib import Path

TASKS = ("ticket", "contact", "isodate")
TRAIN_ROWS = 400
EVAL_ROWS = 48
DATA_DIR = Path(__file__).parent / "data"

Row = dict[str, str]
# Spelt out rather than taken from `calendar`, whose names follow the process locale.
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

# ---- ticket -------------------------------------------------------------------------------
# Each label's messages carry its own content words (charge/refund, parcel/courier,
# password/sign in, crash/error); no template uses another label's words.
TICKET_BODIES = {
    "billing": [
        "I was charged twice for my {plan} subscription.",
        "My {month} invoice shows {amount}, but my plan costs less.",
        "Can I get a refund for the {amount} charge on my card?",
        "Why was my card billed {amount} again this month?",
        "Please cancel the automatic renewal fee on my {plan} plan.",
        "I need a receipt for the {amount} payment I made in {month}.",
        "You overcharged me {amount} for the {plan} plan.",
        "The promo code was not applied to my bill.",
        "I still see a pending charge of {amount} after cancelling.",
        "How do I change the credit card you bill for my {plan} plan?",
        "My bank statement shows an unknown {amount} charge from you.",
        "I was billed for the {plan} plan but downgraded in {month}.",
        "Where is my refund? I asked for it {days} days ago.",
    ],
    "shipping": [
        "My package for order {order} has not arrived yet.",
        "The tracking for order {order} has not updated in {days} days.",
        "The courier left my parcel at the wrong address.",
        "When will my {item} be delivered?",
        "My {item} arrived in a crushed box.",
        "Can I change the delivery address for order {order}?",
        "Tracking says delivered, but there is no {item} at my door.",
        "How much is express shipping to {country}?",
        "Do you ship to {country}, and how long does delivery take?",
        "My {item} was shipped {days} days ago and still is not here.",
        "The parcel with my {item} is stuck in customs.",
        "Only half of order {order} arrived. Where is the rest?",
        "Can the courier bring my {item} on {weekday} instead?",
    ],
    "account": [
        "I can't log in to my account since {weekday}.",
        "I forgot my password and the reset email never came.",
        "How do I change the email address on my account?",
        "Please delete my account and all my data.",
        "My account got locked after too many sign-in attempts.",
        "I want to change my username to {username}.",
        "The two-factor login code never reaches my {device}.",
        "Someone signed in to my account from {country}.",
        "How can I merge my two accounts into one?",
        "I can't verify the new email address on my profile.",
        "I changed my phone number and now I can't sign in.",
        "How do I reset the password for my account?",
        "Can I log in with {username} instead of my email?",
    ],
    "bug": [
        "The app crashes every time I open the {screen}.",
        "The save button on the {screen} does nothing.",
        "I get error {code} when I try to {action}.",
        "The {screen} freezes on my {device}.",
        "Since the last update the {screen} is completely blank.",
        "Dark mode makes the text unreadable on the {screen}.",
        "Notifications show up twice on my {device}.",
        "The app keeps loading forever when I {action}.",
        "Exporting a report to CSV gives me an empty file.",
        "Images on the {screen} are broken on my {device}.",
        "The {screen} spins and then shows error {code}.",
        "Scrolling on the {screen} is glitchy on my {device}.",
        "The app closes by itself when I {action}.",
    ],
}
TICKET_SLOTS = {
    "plan": ["premium", "family", "pro", "basic", "annual", "monthly", "student", "team"],
    "month": MONTHS,
    "amount": ["$9.99", "$14.99", "$29", "$49.50", "$120", "$5", "$79.99", "$200", "$12"],
    "days": ["two", "three", "four", "five", "six", "ten", "12", "14"],
    "item": ["headphones", "sofa", "laptop stand", "running shoes", "coffee maker",
             "phone case", "desk lamp", "backpack", "blender", "winter jacket", "printer"],
    "country": ["Canada", "Mexico", "Japan", "Germany", "Brazil", "Australia", "Kenya",
                "Norway", "Spain", "India"],
    "weekday": WEEKDAYS,
    "username": ["sunny_day42", "mike.r", "bluefox", "anna_k", "tom1987", "greenleaf",
                 "jules_v", "k.ito"],
    "device": ["iPhone", "Android phone", "tablet", "laptop", "Pixel", "iPad"],
    "screen": ["settings page", "home screen", "photo gallery", "search page", "dashboard",
               "calendar view", "chat window", "notes tab", "map view"],
    "action": ["upload a photo", "open a file", "save a draft", "switch tabs",
               "export a report", "rotate my screen", "share a link", "attach a file"],
    "code": ["500", "E1042", "0x80070005", "404", "ERR_TIMEOUT", "E-17", "503"],
}
OPENERS = ["", "", "", "Hi, ", "Hello, ", "Hey, ", "Hi there, ", "Good morning, ",
           "Hello team, ", "Quick question: ", "Help! ", "Hi support, "]
CLOSERS = ["", "", "", " Thanks.", " Thank you!", " Please help.", " Any update?",
           " This is urgent.", " Thanks in advance.", " Please fix this.", " Can you help?"]


def _ticket(rng: random.Random, label: str) -> Row:
    slots = {name: rng.choice(values) for name, values in TICKET_SLOTS.items()}
    slots["order"] = f"#{rng.randint(10000, 99999)}"
    body = rng.choice(TICKET_BODIES[label]).format(**slots)
    opener = rng.choice(OPENERS)
    if opener.endswith((", ", ": ")) and not re.match(r"I\b", body):
        body = body[0].lower() + body[1:]
    text = opener + body + rng.choice(CLOSERS)
    if rng.random() < 0.15:  # people also type tickets in a hurry
        text = text.lower().rstrip(".!?")
    return {"text": text, "label": label}


# ---- contact ------------------------------------------------------------------------------
FIRST_NAMES = ["Maria", "James", "Aisha", "Chen", "Lucas", "Priya", "Olga", "Diego", "Fatima",
               "Noah", "Yuki", "Emma", "Kwame", "Sofia", "Liam", "Hana", "Omar", "Elena", "Tom",
               "Ines", "Raj", "Zoe", "Mateo", "Lena"]
LAST_NAMES = ["Garcia", "Smith", "Khan", "Wang", "Silva", "Patel", "Ivanova", "Lopez", "Haddad",
              "Brown", "Tanaka", "Weber", "Mensah", "Rossi", "Murphy", "Kim", "Farouk", "Novak",
              "Baker", "Costa", "Sharma", "Adams", "Torres", "Berg"]
# Multi-word cities make the model copy a span, not just one word.
CITIES = ["Lisbon", "Chicago", "Nairobi", "Osaka", "Toronto", "Berlin", "Lima", "Mumbai",
          "Cairo", "Oslo", "Seoul", "Dublin", "Madrid", "Denver", "Accra", "Prague", "Austin",
          "Manila", "New York", "San Diego", "Cape Town", "Buenos Aires", "Hong Kong",
          "Rio de Janeiro"]
DEEDS = ["won the chess final", "ran a marathon", "opened a bakery", "joined the choir",
         "started a podcast", "adopted a dog", "painted a mural", "fixed the old bridge"]
CONTACT_TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "{name}, {age}, from {city}.",
    "{name} ({age}) lives in {city}.",
    "Meet {name} from {city}, who just turned {age}.",
    "{city} resident {name} is {age}.",
    "At {age}, {name} moved to {city}.",
    "Our new member is {name}, aged {age}, based in {city}.",
    "In {city}, {age}-year-old {name} {deed}.",
    "Name: {name}; age: {age}; city: {city}.",
    "{name} lives in {city} and is {age}.",
    "The {age}-year-old {name} works in {city}.",
    "Born and raised in {city}, {name} is now {age}.",
    "{name}, a {age}-year-old from {city}, {deed}.",
    "Contact: {name}, {city}, age {age}.",
    "Age {age}, living in {city}: that is {name}.",
    "Last week {name} ({age}, {city}) {deed}.",
]


def _contact(rng: random.Random) -> Row:
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    age, city = rng.randint(18, 85), rng.choice(CITIES)
    text = rng.choice(CONTACT_TEMPLATES).format(
        name=name, age=age, city=city, deed=rng.choice(DEEDS)
    )
    # json.dumps' default separators give the compact one-line form: {"name": "A", "age": 3}
    return {"text": text, "json": json.dumps({"name": name, "age": age, "city": city})}


# ---- isodate ------------------------------------------------------------------------------
FIRST_DAY, LAST_DAY = date(1980, 1, 1), date(2035, 12, 31)
DATE_FORMATS = [
    "{M} {d}, {Y}",
    "{d} {M} {Y}",
    "{m} {o}, {Y}",
    "the {o} of {M} {Y}",
    "the {o} of {M}, {Y}",
    "{m} {d} {Y}",
    "{d} {m} {Y}",
    "{M} {o} {Y}",
    "{o} {M}, {Y}",
    "{W}, {M} {d}, {Y}",
    "{w} {d} {m} {Y}",
    "{m}. {d}, {Y}",
    "{d}-{m}-{Y}",
]
DATE_SENTENCES = ["{}", "{}", "{}", "on {}", "Due {}.", "Meeting: {}", "We met on {}.",
                  "Invoice dated {}", "Born {}", "Deadline is {}."]


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _isodate(rng: random.Random) -> Row:
    day = FIRST_DAY + timedelta(days=rng.randint(0, (LAST_DAY - FIRST_DAY).days))
    written = rng.choice(DATE_FORMATS).format(
        M=MONTHS[day.month - 1],
        m=MONTHS[day.month - 1][:3],
        d=day.day,
        o=_ordinal(day.day),
        Y=day.year,
        W=WEEKDAYS[day.weekday()],
        w=WEEKDAYS[day.weekday()][:3],
    )
    written = written.replace("May.", "May")  # the only month whose abbreviation is the name
    if rng.random() < 0.1:
        written = written.lower()
    return {"text": rng.choice(DATE_SENTENCES).format(written), "iso": day.isoformat()}


# ---- splits -------------------------------------------------------------------------------
# The fields no two rows of a task may share: for contact and isodate the target too, so
# eval asks for people and dates that training never showed.
UNIQUE_FIELDS = {"ticket": ("text",), "contact": ("text", "json"), "isodate": ("text", "iso")}


def _draw(
    make: Callable[[], Row], n: int, fields: tuple[str, ...], seen: set[tuple[str, str]]
) -> list[Row]:
    """`n` rows whose `fields` values are not in `seen` (which grows), so splits cannot overlap."""
    rows: list[Row] = []
    for _ in range(n * 1000):
        row = make()
        keys = {(field, row[field]) for field in fields}
        if not keys & seen:
            seen |= keys
            rows.append(row)
            if len(rows) == n:
                return rows
    raise RuntimeError(f"only {len(rows)} of {n} distinct rows; add templates or slot values")


def _splits(task: str, rng: random.Random) -> tuple[list[Row], list[Row]]:
    """(train, eval) rows; eval is drawn first, and ticket has equal counts of each label."""
    fields, seen = UNIQUE_FIELDS[task], set()
    if task == "ticket":
        makers = [partial(_ticket, rng, label) for label in TICKET_BODIES]
    else:
        makers = [partial({"contact": _contact, "isodate": _isodate}[task], rng)]
    evaluation = [row for m in makers for row in _draw(m, EVAL_ROWS // len(makers), fields, seen)]
    train = [row for m in makers for row in _draw(m, TRAIN_ROWS // len(makers), fields, seen)]
    rng.shuffle(train)
    rng.shuffle(evaluation)
    return train, evaluation


def generate(out_dir: Path, seed: int = 0) -> list[Path]:
    """Write `<task>.train.jsonl` and `<task>.eval.jsonl` for every demo task; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task in TASKS:
        # One generator per task, so editing one task's templates leaves the others' rows alone.
        train, evaluation = _splits(task, random.Random(f"{task}:{seed}"))
        for split, rows in (("train", train), ("eval", evaluation)):
            path = out_dir / f"{task}.{split}.jsonl"
            lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
            path.write_text("".join(lines), encoding="utf-8", newline="\n")
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="folder for the JSONL files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in generate(args.out, args.seed):
        print(f"wrote {path} ({sum(1 for _ in path.open())} rows)")


if __name__ == "__main__":
    main()
