"""docs/protocol.md names exactly the message types the node accepts (protocol.messages'
registry): in the payload's `type` rule (section 2.1), the table of where each travels and
the headings of section 3."""

from __future__ import annotations

import re
from pathlib import Path

from protocol.messages import DECODERS

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def section(title: str) -> str:
    text = DOCS.read_text()
    start = re.search(rf"^##+ {re.escape(title)}", text, re.M)
    assert start, f"docs/protocol.md has no section {title!r}"
    end = re.search(r"^## ", text[start.end():], re.M)
    return text[start.start():start.end() + end.start() if end else len(text)]


def test_the_payload_type_rule_lists_every_accepted_type():
    [row] = [line for line in section("2.1 The payload").splitlines()
             if line.startswith("| `type`")]
    assert set(re.findall(r'`"(\w+)"`', row)) == set(DECODERS)


def test_section_3_describes_every_accepted_type():
    messages = section("3. Messages")
    where = messages[messages.index("| type "):]
    where = where[:where.index("\n\n")]  # the table of where each type travels
    table = set(re.findall(r"^\| `(\w+)` +\|", where, re.M))
    headings = set(re.findall(r"^### 3\.\d+ `(\w+)`", messages, re.M))
    assert table == set(DECODERS)
    assert headings == set(DECODERS)
