"""Plain-text tables for reports and the command line: one renderer for all of them."""
from __future__ import annotations

from typing import Sequence


def render_table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None, align: str = "",
                 rule_before: Sequence[int] = (), indent: str = "") -> str:
    """Columns padded to their widest cell, two spaces apart, trailing spaces removed.

    Args:
        rows: the body, one sequence of cell strings per row, all of one length.
        header: column titles, followed by a rule (a line of ``-``).
        align: ``"l"`` or ``"r"`` per column (missing ones: ``"l"``); numbers read best right-aligned.
        rule_before: indexes of body rows to put a rule above (e.g. a total row).
        indent: put before every line.
    """
    table = [list(header)] if header is not None else []
    table += [list(row) for row in rows]
    if not table:
        return ""
    n_columns = len(table[0])
    if any(len(row) != n_columns for row in table):
        raise ValueError(f"rows of a table must have {n_columns} cells; got lengths {sorted({len(r) for r in table})}")
    widths = [max(len(row[i]) for row in table) for i in range(n_columns)]
    sides = align.ljust(n_columns, "l")
    lines = ["  ".join(c.rjust(w) if side == "r" else c.ljust(w) for c, w, side in zip(row, widths, sides)).rstrip()
             for row in table]
    rule = "-" * max(len(line) for line in lines)
    first_body = 1 if header is not None else 0
    positions = {first_body + i for i in rule_before} | ({1} if header is not None else set())
    for position in sorted(positions, reverse=True):
        lines.insert(position, rule)
    return "\n".join(indent + line for line in lines)
