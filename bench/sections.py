"""bench/RESULTS.md holds the REST benchmark's tables plus one marked section per other benchmark
(`<!-- name:begin -->` … `<!-- name:end -->`); each benchmark rewrites only its own part."""

from __future__ import annotations

import re
from pathlib import Path

_SECTION = re.compile(r"<!-- (?P<name>[a-z-]+):begin -->.*?<!-- (?P=name):end -->\n?", re.S)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(path: Path, name: str, body: str) -> None:
    """Replaces section `name` of `path` with `body` (without markers), or appends it."""
    begin, end = markers(name)
    section = f"{begin}\n{body.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        text = head + section + rest.partition(end)[2].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def keep_sections(old_text: str, new_text: str) -> str:
    """For the REST benchmark, which rewrites the whole file: carry every marked section over."""
    kept = [match.group(0).rstrip("\n") for match in _SECTION.finditer(old_text)]
    return "\n\n".join([new_text.rstrip("\n"), *kept]) + "\n"
