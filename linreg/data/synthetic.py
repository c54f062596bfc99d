"""An embedded, seeded generator of simple children's stories (TinyStories-like), for offline runs.

The stories are built from small word lists and sentence templates: a main character (a named child or
animal), a place, an object, a friend, and one of several plots (a lost object, a problem solved with
help, a sharing quarrel, a trip, a fear overcome, a gift). Pronouns, names and objects stay consistent
inside a story, so a small language model has real structure to learn (its loss drops quickly in the
first few hundred steps) while the vocabulary stays small.

``synthetic_stories(n, seed)`` is deterministic in ``(n, seed)``: the first ``k`` stories of
``synthetic_stories(n, s)`` equal ``synthetic_stories(k, s)``. It has no dependencies and produces
about 10k stories in a fraction of a second.
"""

from __future__ import annotations

import random

__all__ = ["synthetic_stories"]

_GIRLS = ["Lily", "Mia", "Sue", "Anna", "Emma", "Zoe", "Lucy", "Ella", "Sara", "Amy", "Rosa", "Kim", "Nora", "Ivy"]
_BOYS = ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Noah", "Joe", "Dan", "Oscar", "Eli", "Ray"]
_ANIMALS = [
    ("cat", "meow"), ("dog", "woof"), ("bunny", "squeak"), ("bird", "tweet"), ("duck", "quack"),
    ("frog", "ribbit"), ("bear", "growl"), ("mouse", "squeak"), ("fox", "yip"), ("owl", "hoot"),
    ("pig", "oink"), ("lamb", "baa"), ("puppy", "yap"), ("kitten", "mew"),
]
_ANIMAL_NAMES = ["Spot", "Fluffy", "Pip", "Coco", "Bubbles", "Sunny", "Patch", "Ziggy", "Bella", "Rex", "Daisy", "Buddy"]
_ADJ = ["little", "happy", "small", "kind", "brave", "silly", "curious", "shy", "friendly", "tiny", "clever", "sleepy"]
_PLACES = [
    ("park", "in the park"), ("garden", "in the garden"), ("forest", "in the forest"), ("beach", "at the beach"),
    ("farm", "on the farm"), ("house", "in a small house"), ("town", "in a quiet town"), ("school", "at school"),
    ("pond", "by the pond"), ("hill", "on a green hill"), ("lake", "near the lake"), ("zoo", "at the zoo"),
]
_OBJECTS = [
    ("ball", "red"), ("kite", "blue"), ("doll", "pretty"), ("toy car", "shiny"), ("book", "big"), ("hat", "yellow"),
    ("teddy bear", "soft"), ("balloon", "green"), ("cup", "pink"), ("box", "brown"), ("drum", "loud"),
    ("boat", "little"), ("crayon", "purple"), ("shell", "white"), ("flower", "bright"), ("cookie", "sweet"),
]
_FOODS = ["cake", "apples", "cookies", "soup", "bread", "ice cream", "berries", "carrots", "pie", "candy"]
_FEEL_GOOD = ["happy", "glad", "proud", "excited", "joyful"]
_FEEL_BAD = ["sad", "worried", "upset", "scared", "grumpy"]
_WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "snowy"]
_ACTIVITIES = ["play", "run", "jump", "sing", "dance", "draw", "read", "swim", "dig", "climb"]
_HELPERS = ["mom", "dad", "grandma", "grandpa", "teacher", "big sister", "big brother"]
_LESSONS = [
    "sharing is caring", "it is good to ask for help", "friends make everything better",
    "being brave is not so hard", "it is nice to be kind", "you should always say sorry",
    "working together is fun", "it is good to be careful",
]
_ENDINGS = [
    "From that day on, {n} and {f} were best friends.",
    "{N} smiled and gave {f} a big hug.",
    "They played together until the sun went down.",
    "That night, {n} went to bed with a big smile.",
    "It was the best day ever.",
    "{N} learned that {lesson}.",
]


class _Char:
    __slots__ = ("name", "he", "him", "his", "kind")

    def __init__(self, name: str, female: bool, kind: str):
        self.name = name
        self.kind = kind
        self.he, self.him, self.his = ("she", "her", "her") if female else ("he", "him", "his")


def _character(rng: random.Random, avoid: str = "") -> _Char:
    while True:
        r = rng.random()
        if r < 0.6:
            female = rng.random() < 0.5
            name = rng.choice(_GIRLS if female else _BOYS)
            kind = "girl" if female else "boy"
        else:
            female = rng.random() < 0.5
            animal, _ = rng.choice(_ANIMALS)
            name = rng.choice(_ANIMAL_NAMES)
            kind = animal
        if name != avoid:
            return _Char(name, female, kind)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _story(rng: random.Random) -> str:
    c = _character(rng)
    f = _character(rng, avoid=c.name)
    place, at_place = rng.choice(_PLACES)
    obj, color = rng.choice(_OBJECTS)
    adj = rng.choice(_ADJ)
    good, bad = rng.choice(_FEEL_GOOD), rng.choice(_FEEL_BAD)
    act = rng.choice(_ACTIVITIES)
    helper = rng.choice(_HELPERS)
    weather = rng.choice(_WEATHER)
    food = rng.choice(_FOODS)
    a_f = f"a {f.kind}" if f.kind not in ("owl",) else "an owl"
    a_c = f"a {adj} {c.kind}"
    opening = rng.choice([
        f"Once upon a time, there was {a_c} named {c.name}.",
        f"Once upon a time, {at_place}, there lived {a_c} named {c.name}.",
        f"One {weather} day, {a_c} named {c.name} went to the {place}.",
        f"There was once {a_c} called {c.name}.",
    ])
    s = [opening]
    s.append(rng.choice([
        f"{c.name} loved to {act} every day.",
        f"{_cap(c.he)} had a {color} {obj} that {c.he} loved very much.",
        f"{_cap(c.he)} liked to {act} {at_place} with {c.his} {helper}.",
        f"Every morning, {c.name} ate {food} and went outside to {act}.",
    ]))
    plot = rng.randrange(6)
    if plot == 0:  # lost object
        s += [
            f"One day, {c.name} took {c.his} {color} {obj} to the {place}.",
            f"{_cap(c.he)} played with it all morning. Then {c.he} looked down, and the {obj} was gone!",
            f"{c.name} felt very {bad}. {_cap(c.he)} looked under the trees and behind the rocks.",
            f"Then {c.name} met {a_f} named {f.name}. \"Why are you {bad}?\" asked {f.name}.",
            f"\"I lost my {obj},\" said {c.name}. \"I will help you,\" said {f.name}.",
            f"They looked and looked. At last, {f.name} found the {obj} near a big {rng.choice(['tree', 'rock', 'bush', 'bench'])}.",
            f"{c.name} was so {good}. \"Thank you, {f.name}!\" {c.he} said.",
        ]
    elif plot == 1:  # problem solved with help
        thing = rng.choice(["a tall tree", "a high shelf", "the roof", "a big wall"])
        s += [
            f"One day, {c.name} threw {c.his} {obj} very high, and it got stuck on {thing}.",
            f"{_cap(c.he)} tried to jump, but {c.he} was too small. {c.name} felt {bad}.",
            f"{_cap(c.his)} {helper} saw {c.him} and said, \"Let me help you.\"",
            f"The {helper} got a long stick and pushed the {obj} down.",
            f"\"Thank you!\" said {c.name}. {_cap(c.he)} was {good} again.",
            f"After that, {c.name} played with the {obj} more carefully.",
        ]
    elif plot == 2:  # sharing quarrel
        s += [
            f"One day, {c.name} was playing with {c.his} {color} {obj} {at_place}.",
            f"{_cap(a_f)} named {f.name} came by."
            f" {f.name} saw the {obj} and said, \"Can I play with it too?\"",
            f"At first, {c.name} did not want to share. \"No, it is mine!\" {c.he} said.",
            f"{f.name} felt {bad} and walked away.",
            f"{c.name} sat alone. Playing alone was not fun at all.",
            f"So {c.name} ran to {f.name} and said, \"I am sorry. Let us play together.\"",
            f"They played with the {obj} and laughed a lot.",
        ]
    elif plot == 3:  # a trip
        dest, at_dest = rng.choice(_PLACES)
        s += [
            f"One {weather} morning, {c.name} and {c.his} {helper} went to the {dest}.",
            f"{_cap(c.he)} took {c.his} {obj} and some {food} in a bag.",
            f"{at_dest.capitalize()}, {c.name} saw {a_f} named {f.name}.",
            f"\"Do you want to {act} with me?\" asked {c.name}. \"Yes!\" said {f.name}.",
            f"They had lots of fun. They ate the {food} and played with the {obj}.",
            f"When it was time to go home, {c.name} waved goodbye to {f.name}.",
        ]
    elif plot == 4:  # fear overcome
        fear = rng.choice(["the dark", "the big dog", "the loud thunder", "the deep water", "the tall slide"])
        s += [
            f"But {c.name} was afraid of {fear}.",
            f"One night, {c.name} felt very {bad} because of {fear}.",
            f"{_cap(c.his)} friend {f.name} came and said, \"Do not be {bad}. I am here with you.\"",
            f"{f.name} held {c.his} hand. {c.name} took a deep breath.",
            f"Soon, {c.he} was not afraid anymore. {_cap(c.he)} felt brave and {good}.",
        ]
    else:  # a gift
        s += [
            f"It was {f.name}'s birthday, and {c.name} wanted to give {f.him} a gift.",
            f"{_cap(c.he)} made a {color} {obj} all by {c.him}self.",
            f"{c.name} walked to {f.name}'s home and knocked on the door.",
            f"\"Happy birthday!\" said {c.name}. {f.name} opened the gift.",
            f"{f.name} was very {good}. \"I love it!\" {f.he} said.",
            f"They ate {food} and played {at_place} all afternoon.",
        ]
    ending = rng.choice(_ENDINGS).format(n=c.name, N=c.name, f=f.name, lesson=rng.choice(_LESSONS))
    s.append(ending)
    # two or three paragraphs, like TinyStories
    cut = rng.randrange(2, len(s) - 1)
    return " ".join(s[:cut]) + "\n\n" + " ".join(s[cut:])


def synthetic_stories(n_docs: int, seed: int) -> list[str]:
    """``n_docs`` short stories, deterministic in ``seed`` (prefix-stable in ``n_docs``)."""
    if n_docs < 0:
        raise ValueError(f"n_docs must be >= 0, got {n_docs}")
    rng = random.Random(f"linreg-synthetic-stories/{int(seed)}")
    return [_story(rng) for _ in range(int(n_docs))]
