#!/usr/bin/env python3
"""Write the README's vocabulary section from pcapflow/vocab.py (the one definition).

    python tools/vocab_doc.py            # print the section
    python tools/vocab_doc.py --write    # replace it in README.md between its markers
"""
from __future__ import annotations

import sys
from pathlib import Path

from pcapflow import vocab

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- vocab:begin -->", "<!-- vocab:end -->"
TABLES = [
    ("close_type", vocab.CLOSE_TYPES), ("active_closer", vocab.ACTIVE_CLOSERS),
    ("states (`client_state_end`, `server_state_end`, events)", vocab.STATES),
    ("rst_kind", vocab.RST_KINDS), ("vantage", vocab.VANTAGES),
    ("losses[].position", vocab.LOSS_POSITIONS), ("events kind", vocab.EVENT_KINDS),
    ("findings kind", vocab.FINDING_KINDS), ("captures[].skipped", vocab.SKIP_REASONS),
]


def section() -> str:
    parts = [BEGIN]
    for title, names in TABLES:
        parts += [f"\n**{title}**\n", "| value | meaning |", "|---|---|"]
        parts += [f"| `{name}` | {text} |" for name, text in names.items()]
    parts.append(END)
    return "\n".join(parts)


def main() -> int:
    if "--write" not in sys.argv:
        print(section())
        return 0
    text = README.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    README.write_text(text[:start] + section() + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
