"""The "Trade-off" section of an exported Pareto-front member's model card.

Input (the ``tradeoff`` key of a card): ``{"split": str, "objectives": [names],
"member": {"id", "values": [..], "se": [..|None]}, "neighbours": [{"id", "values"}, ...],
"front_size": int, "preferred": bool}``; output: Markdown lines.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _pm(value: float, se: float | None) -> str:
    return f"{value:.4g} ± {se:.2g}" if se is not None else f"{value:.4g} (SE n/a)"


def tradeoff_lines(t: Mapping[str, Any]) -> list[str]:
    """Markdown lines for the trade-off section.

    Args:
        t: the card's ``tradeoff`` block (see the module docstring).

    Raises:
        KeyError: a required key is missing.
    """
    names = list(t["objectives"])
    member = t["member"]
    ses = list(member.get("se") or [None] * len(names))
    lines = ["## Trade-off", "",
             f"This model is one of {t['front_size']} members of the run's Pareto front, chosen on "
             f"the **{t['split']}** split (no member is better on every objective at once)."
             + (" It is the member picked for the stated preference." if t.get("preferred") else ""),
             "", "| objective | score ± standard error |", "|---|---|"]
    lines += [f"| {n} | {_pm(v, s)} |" for n, v, s in zip(names, member["values"], ses)]
    lines.append("")
    if t.get("neighbours"):
        lines += ["Neighbouring front members (what moving along the front costs or gains):", "",
                  "| candidate | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for nb in t["neighbours"]:
            diffs = [f"{v:.4g} ({v - mv:+.3g})" for v, mv in zip(nb["values"], member["values"])]
            lines.append(f"| {nb['id']} | " + " | ".join(diffs) + " |")
        lines.append("")
    return lines
