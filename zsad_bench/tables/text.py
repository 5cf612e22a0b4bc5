"""Cell text and table layout for Markdown and LaTeX: escaping, number formatting, best marks, one grid."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tabulate import tabulate

from zsad_bench.tables.aggregate import INCOMPLETE_MARK

PARTIAL_MARK = "‡"
SUBSET_MARK = "§"
NO_MASKS = "n/a (no masks)"

_MD_SPECIAL = {"\\": "\\\\", "|": "\\|", "*": "\\*", "`": "\\`", "<": "\\<", "[": "\\[", "]": "\\]"}
_MD_PROSE = {k: v for k, v in _MD_SPECIAL.items() if k in "\\*`<"}
_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "|": r"\textbar{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "\n": " ",
    "\r": " ",
    INCOMPLETE_MARK: r"$^\dagger$",
    PARTIAL_MARK: r"$^\ddagger$",
    SUBSET_MARK: r"$^\S$",
}


def md_escape(text: str) -> str:
    """A Markdown table cell that shows ``text`` as written: pipes, emphasis, code, HTML and link marks escaped."""
    return "".join(_MD_SPECIAL.get(ch, " " if ch in "\r\n" else ch) for ch in str(text))


def prose(text: str, fmt: str) -> str:
    """Titles and footnotes: Markdown escapes only what would turn into emphasis, code or HTML (brackets and
    pipes are harmless outside a table); LaTeX escapes as for cells."""
    if fmt != "md":
        return latex_escape(text)
    return "".join(_MD_PROSE.get(ch, " " if ch in "\r\n" else ch) for ch in str(text))


def latex_escape(text: str) -> str:
    """LaTeX text for ``text`` (specials escaped, ``->`` as an arrow, daggers as superscripts)."""
    parts = str(text).split("->")
    return r"$\rightarrow$".join("".join(_LATEX_SPECIAL.get(ch, ch) for ch in p) for p in parts)


def escape(text: str, fmt: str) -> str:
    return md_escape(text) if fmt == "md" else latex_escape(text)


@dataclass
class CellText:
    """What a cell shows, beyond its number."""

    ci: tuple[float, float] | None = None
    no_masks: bool = False
    partial: bool = False
    subset: bool = False


def fmt_cell(mean: float, std: float, n: int, fmt: str, bold: bool, extra: CellText | None = None) -> str:
    extra = extra or CellText()
    if extra.no_masks:
        return NO_MASKS
    if mean is None or not math.isfinite(mean):
        return "–" if fmt == "md" else "--"
    text = f"{100 * mean:.1f}"
    if n > 1 and math.isfinite(std):
        pm = " ± " if fmt == "md" else r" $\pm$ "
        text += f"{pm}{100 * std:.1f}"
    if extra.ci is not None:
        text += f" [{100 * extra.ci[0]:.1f}, {100 * extra.ci[1]:.1f}]"
    if bold:
        text = f"**{text}**" if fmt == "md" else rf"\textbf{{{text}}}"
    if extra.partial:
        text += PARTIAL_MARK if fmt == "md" else r"$^\ddagger$"
    if extra.subset:
        text += SUBSET_MARK if fmt == "md" else r"$^\S$"
    return text


def best_mask(values: list[float | None], eligible: list[bool]) -> list[bool]:
    """Best (highest) value(s) as displayed with one decimal among the eligible columns; ties are all best."""
    shown = [
        round(100 * v, 1) if ok and v is not None and math.isfinite(v) else None
        for v, ok in zip(values, eligible, strict=True)
    ]
    present = [v for v in shown if v is not None]
    if not present:
        return [False] * len(values)
    return [v == max(present) for v in shown]


def grid_text(
    title: str, header: list[str], body: list[list[str]], fmt: str, rules: Sequence[int], notes: list[str]
) -> str:
    """One table; ``rules``: body row indexes with a rule above them (LaTeX); ``notes`` go under it."""
    if fmt == "md":
        text = f"**{title}**\n\n" + tabulate(body, headers=header, tablefmt="pipe", disable_numparse=True) + "\n"
        return text + ("\n" + "\n".join(f"{n}  " for n in notes).rstrip() + "\n" if notes else "")
    lines = [
        r"\begin{table}[ht]",
        r"\centering",
        rf"\caption{{{title}}}",
        r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    for i, row in enumerate(body):
        if i in rules and i > 0:
            lines.append(r"\midrule")
        lines.append(" & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if notes:
        lines.append(r"\par\smallskip{\footnotesize " + r" \\ ".join(notes) + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def percent_text(fraction: float) -> str:
    """Percent with up to 4 decimals and at least one, like the papers' CSVs (``99.2``, ``100.0``)."""
    text = f"{100 * fraction:.4f}".rstrip("0")
    return text + "0" if text.endswith(".") else text
