"""Grade-school maths word problems with worked, step-by-step answers (GSM8K-style).

Deterministic from a seed. Names, objects, numbers, units and the problem structure all vary, so a
model cannot memorise answers: it has to learn the arithmetic.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

NAMES = [
    "Aiko", "Ben", "Chen", "Dana", "Emeka", "Fatima", "Goro", "Hana", "Ivan", "Jia", "Kofi", "Lena",
    "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei",
    "Ximena", "Yuki", "Zane", "Amir", "Bea", "Carlos", "Devi", "Elif", "Farid", "Greta", "Hugo",
]
ITEMS = [
    ("apple", "apples"), ("pencil", "pencils"), ("marble", "marbles"), ("sticker", "stickers"),
    ("book", "books"), ("cookie", "cookies"), ("stamp", "stamps"), ("shell", "shells"),
    ("card", "cards"), ("bead", "beads"), ("egg", "eggs"), ("plant", "plants"), ("ticket", "tickets"),
    ("brick", "bricks"), ("orange", "oranges"), ("candle", "candles"), ("button", "buttons"),
]
CONTAINERS = ["box", "bag", "crate", "basket", "jar", "tray", "shelf", "packet"]
SHOPS = ["market", "bakery", "bookshop", "hardware store", "school fair", "corner shop"]


def _money(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}" if cents % 100 else f"${cents // 100}"


def _p_buy_and_change(r: random.Random) -> tuple[str, str, int]:
    name, (_, many) = r.choice(NAMES), r.choice(ITEMS)
    n, price = r.randint(2, 12), r.randint(1, 9) * r.choice([25, 50, 100])
    cost = n * price
    paid = ((cost // 1000) + 1) * 1000 + r.choice([0, 1000, 2000])
    q = (f"{name} buys {n} {many} at the {r.choice(SHOPS)} for {_money(price)} each and pays with "
         f"{_money(paid)}. How much change, in cents, does {name} get?")
    a = (f"The {many} cost {n} * {price} = <<{n}*{price}={cost}>>{cost} cents. "
         f"The change is {paid} - {cost} = <<{paid}-{cost}={paid - cost}>>{paid - cost} cents.")
    return q, a, paid - cost


def _p_containers(r: random.Random) -> tuple[str, str, int]:
    name, (_, many), box = r.choice(NAMES), r.choice(ITEMS), r.choice(CONTAINERS)
    boxes, per, extra, gave = r.randint(3, 15), r.randint(4, 24), r.randint(0, 30), r.randint(1, 20)
    total = boxes * per + extra
    gave = min(gave, total)
    q = (f"{name} has {boxes} {box}es with {per} {many} in each {box} and {extra} loose {many}. "
         f"{name} gives away {gave} {many}. How many {many} are left?")
    a = (f"The {box}es hold {boxes} * {per} = <<{boxes}*{per}={boxes * per}>>{boxes * per} {many}. "
         f"With the loose ones that is {boxes * per} + {extra} = <<{boxes * per}+{extra}={total}>>{total}. "
         f"After giving {gave} away, {total} - {gave} = <<{total}-{gave}={total - gave}>>{total - gave} are left.")
    return q, a, total - gave


def _p_share(r: random.Random) -> tuple[str, str, int]:
    names = r.sample(NAMES, 3)
    (one, many) = r.choice(ITEMS)
    people = r.randint(2, 9)
    each = r.randint(3, 25)
    total = people * each
    kept = r.randint(1, 15)
    q = (f"{names[0]} collected {total + kept} {many}, kept {kept} and shared the rest equally among "
         f"{people} friends, including {names[1]} and {names[2]}. How many {many} did each friend get?")
    a = (f"{names[0]} shared {total + kept} - {kept} = <<{total + kept}-{kept}={total}>>{total} {many}. "
         f"Each friend got {total} / {people} = <<{total}/{people}={each}>>{each}.")
    return q, a, each


def _p_rate(r: random.Random) -> tuple[str, str, int]:
    name = r.choice(NAMES)
    speed, hours, minutes = r.randint(3, 90), r.randint(1, 8), r.choice([0, 15, 30, 45])
    if speed % 4:
        minutes = 0 if minutes in (15, 45) else minutes
    if speed % 2:
        minutes = 0
    dist = speed * hours + speed * minutes // 60
    q = (f"{name} travels at {speed} km per hour for {hours} hours and {minutes} minutes. "
         f"How many kilometres does {name} travel?")
    a = (f"In {hours} hours {name} covers {speed} * {hours} = <<{speed}*{hours}={speed * hours}>>{speed * hours} km. "
         f"In {minutes} minutes, {speed} * {minutes} / 60 = <<{speed}*{minutes}/60={speed * minutes // 60}>>{speed * minutes // 60} km. "
         f"Altogether {speed * hours} + {speed * minutes // 60} = <<{speed * hours}+{speed * minutes // 60}={dist}>>{dist} km.")
    return q, a, dist


def _p_percent(r: random.Random) -> tuple[str, str, int]:
    name, (one, many) = r.choice(NAMES), r.choice(ITEMS)
    price = r.randint(2, 60) * 20
    pct = r.choice([5, 10, 15, 20, 25, 30, 40, 50])
    off = price * pct // 100
    n = r.randint(1, 6)
    q = (f"A {one} costs {price} yen. During a sale the price drops by {pct}%. "
         f"{name} buys {n} {many if n > 1 else one} in the sale. How many yen does {name} pay?")
    a = (f"The discount is {price} * {pct} / 100 = <<{price}*{pct}/100={off}>>{off} yen, so one costs "
         f"{price} - {off} = <<{price}-{off}={price - off}>>{price - off} yen. "
         f"{n} cost {n} * {price - off} = <<{n}*{price - off}={n * (price - off)}>>{n * (price - off)} yen.")
    return q, a, n * (price - off)


def _p_ages(r: random.Random) -> tuple[str, str, int]:
    a_name, b_name = r.sample(NAMES, 2)
    b_age, diff, years = r.randint(3, 40), r.randint(1, 30), r.randint(2, 20)
    q = (f"{a_name} is {diff} years older than {b_name}, who is {b_age}. "
         f"How old will {a_name} be in {years} years?")
    a = (f"{a_name} is {b_age} + {diff} = <<{b_age}+{diff}={b_age + diff}>>{b_age + diff} now. "
         f"In {years} years {a_name} will be {b_age + diff} + {years} = "
         f"<<{b_age + diff}+{years}={b_age + diff + years}>>{b_age + diff + years}.")
    return q, a, b_age + diff + years


def _p_area(r: random.Random) -> tuple[str, str, int]:
    name = r.choice(NAMES)
    w, h, tile = r.randint(2, 30), r.randint(2, 30), r.choice([1, 2, 3, 4, 5])
    price = r.randint(2, 40)
    area = w * h
    q = (f"{name} wants to paint a wall {w} m wide and {h} m high. Paint costs {price} dollars per "
         f"square metre and {name} has a coupon for {tile * 5} dollars off. What is the final cost?")
    cost = area * price
    final = max(cost - tile * 5, 0)
    a = (f"The wall is {w} * {h} = <<{w}*{h}={area}>>{area} square metres. Paint costs {area} * {price} = "
         f"<<{area}*{price}={cost}>>{cost} dollars. With the coupon: {cost} - {tile * 5} = "
         f"<<{cost}-{tile * 5}={final}>>{final} dollars.")
    return q, a, final


def _p_weekly(r: random.Random) -> tuple[str, str, int]:
    name = r.choice(NAMES)
    per_day, days, weeks, spent = r.randint(2, 40), r.randint(2, 7), r.randint(2, 12), r.randint(0, 100)
    earned = per_day * days * weeks
    spent = min(spent, earned)
    q = (f"{name} saves {per_day} coins on each of {days} days a week for {weeks} weeks, then spends "
         f"{spent} coins on a gift. How many coins are left?")
    a = (f"Each week {name} saves {per_day} * {days} = <<{per_day}*{days}={per_day * days}>>{per_day * days}. "
         f"Over {weeks} weeks that is {per_day * days} * {weeks} = <<{per_day * days}*{weeks}={earned}>>{earned}. "
         f"After the gift, {earned} - {spent} = <<{earned}-{spent}={earned - spent}>>{earned - spent} coins are left.")
    return q, a, earned - spent


def _p_arith(r: random.Random) -> tuple[str, str, int]:
    a, b, c = r.randint(2, 999), r.randint(2, 99), r.randint(2, 99)
    op = r.choice(["+", "-", "*"])
    inner = {"+": a + b, "-": a - b, "*": a * b}[op]
    result = inner + c
    q = f"Calculate ({a} {op} {b}) + {c}."
    ans = (f"First {a} {op} {b} = <<{a}{op}{b}={inner}>>{inner}. "
           f"Then {inner} + {c} = <<{inner}+{c}={result}>>{result}.")
    return q, ans, result


TEMPLATES: list[Callable[[random.Random], tuple[str, str, int]]] = [
    _p_buy_and_change, _p_containers, _p_share, _p_rate, _p_percent, _p_ages, _p_area, _p_weekly, _p_arith,
]


def problems(seed: int, count: int) -> Iterator[dict]:
    """`count` problems as {"question", "answer" (worked, ending '#### N'), "target"}; no exact repeats."""
    r = random.Random(seed)
    seen: set[str] = set()
    while len(seen) < count:
        q, a, target = r.choice(TEMPLATES)(r)
        if q in seen:
            continue
        seen.add(q)
        yield {"question": q, "answer": f"{a}\n#### {target}", "target": str(target)}
