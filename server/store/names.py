"""Readable random run names (adjective-noun-NNN), for runs created without one."""

from __future__ import annotations

import random

_ADJECTIVES = (
    "amber", "bold", "brave", "bright", "calm", "clever", "cosmic", "crisp", "dapper", "eager", "fair",
    "fleet", "gentle", "glad", "grand", "happy", "hardy", "humble", "jolly", "keen", "kind", "lively",
    "lucid", "merry", "mighty", "nimble", "noble", "patient", "placid", "polite", "proud", "quick",
    "quiet", "rapid", "rustic", "serene", "sharp", "shiny", "silent", "smooth", "steady", "sturdy",
    "sunny", "swift", "tidy", "upbeat", "valiant", "vivid", "warm", "witty", "zesty",
)
_NOUNS = (
    "badger", "bat", "bear", "bee", "bison", "boar", "carp", "cat", "colt", "crane", "crow", "deer",
    "dove", "eagle", "eel", "elk", "falcon", "ferret", "finch", "fox", "frog", "gecko", "goat", "hare",
    "hawk", "heron", "horse", "ibis", "jay", "koala", "lark", "lynx", "mink", "mole", "moose", "newt",
    "otter", "owl", "panda", "quail", "raven", "robin", "seal", "shrew", "skink", "snail", "stork",
    "swan", "toad", "trout", "vole", "wasp", "whale", "wolf", "wren", "yak", "zebra",
)
_rng = random.SystemRandom()


def random_run_name() -> str:
    return f"{_rng.choice(_ADJECTIVES)}-{_rng.choice(_NOUNS)}-{_rng.randint(0, 999)}"
