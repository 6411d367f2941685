"""Tables for papers: the claims x models matrix and the ΔPPL table as LaTeX (booktabs).

`matrix_latex` and `delta_ppl_latex` return ``table`` environments to ``\\input`` into a paper
(preamble: ``\\usepackage{booktabs}``); `latex_document` wraps them into a document that compiles
on its own. Text is escaped (`escape`: ``\\ { } $ & # ^ _ % ~ < > |`` and the few non-ASCII
symbols the reports use); numbers are set in math mode with ``\\times 10^{n}`` exponents.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from esa.claims.report_format import fmt
from esa.claims.report_tables import delta_ppl_table

_ESCAPES = {
    "\\": r"\textbackslash{}",
    "{": r"\{",
    "}": r"\}",
    "$": r"\$",
    "&": r"\&",
    "#": r"\#",
    "^": r"\textasciicircum{}",
    "_": r"\_",
    "%": r"\%",
    "~": r"\textasciitilde{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
    "Δ": r"$\Delta$",
    "σ": r"$\sigma$",
    "×": r"$\times$",
    "·": r"$\cdot$",
    "≥": r"$\geq$",
    "≤": r"$\leq$",
    "–": "--",
    "—": "---",
    "…": r"\ldots{}",
}
_SPECIAL = re.compile("|".join(re.escape(k) for k in _ESCAPES))
PACKAGES = ("booktabs", "graphicx")  # rules; resizebox for a table wider than the text
PREAMBLE = "\\documentclass{article}\n\\usepackage[T1]{fontenc}\n" + "".join(
    f"\\usepackage{{{p}}}\n" for p in PACKAGES
)


def escape(text) -> str:
    """`text` (any value, through `fmt` unless a string) safe in LaTeX text mode.

    >>> escape("grad_x_weight 5% & #1")
    'grad\\\\_x\\\\_weight 5\\\\% \\\\& \\\\#1'
    """
    return _SPECIAL.sub(lambda m: _ESCAPES[m.group(0)], text if isinstance(text, str) else fmt(text))


def number(value) -> str:
    """A value in math mode: 4 significant digits, ``1.2\\times 10^{7}`` for exponents, ``\\infty``;
    NaN and non-numbers as escaped text."""
    text = fmt(value)
    if text in ("inf", "-inf"):
        return f"${text[:-3]}\\infty$"
    if not re.fullmatch(r"-?[0-9.]+(e[+-][0-9]+)?", text):
        return escape(text)
    mantissa, _, exponent = text.partition("e")
    return f"${mantissa}\\times 10^{{{int(exponent)}}}$" if exponent else f"${text}$"


def stack(*lines: str, align: str = "l") -> str:
    """The non-empty `lines` on top of each other in one cell (a nested tabular: no package)."""
    kept = [x for x in lines if x]
    if len(kept) < 2:
        return kept[0] if kept else ""
    return f"\\begin{{tabular}}[t]{{@{{}}{align}@{{}}}}" + r" \\ ".join(kept) + "\\end{tabular}"


def interval(value, ci) -> str:
    """The value over its CI "[low, high]" (smaller), right-aligned, in LaTeX."""
    low_high = f"\\footnotesize [{number(ci[0])}, {number(ci[1])}]" if ci else ""
    return stack(number(value), low_high, align="r")


def tabular(columns: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A booktabs ``tabular`` of already-escaped cells (\\toprule, \\midrule, \\bottomrule)."""
    align = align or "l" * len(columns)
    lines = [f"\\begin{{tabular}}{{{align}}}", "\\toprule", " & ".join(columns) + r" \\", "\\midrule"]
    lines += [" & ".join(r) + r" \\" for r in rows]
    return "\n".join([*lines, "\\bottomrule", "\\end{tabular}"])


def fit(body: str) -> str:
    """`body` scaled down to the line width when wider, never up (graphicx ``\\resizebox``)."""
    return f"\\resizebox{{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}}{{!}}{{%\n{body}}}"


def table_env(body: str, caption: str, label: str) -> str:
    """``body`` in a floating ``table`` with `caption` (escaped here) and `label`."""
    return "\n".join(
        [
            "\\begin{table}[htbp]",
            "\\centering",
            "\\small",
            f"\\caption{{{escape(caption)}}}",
            f"\\label{{{label}}}",
            fit(body),
            "\\end{table}",
        ]
    )


def _cell_value(cell: Mapping) -> str:
    """A matrix cell's key value for print: numbers, and text of at most 16 characters (a weight's
    name is for the HTML report, not for a table column)."""
    raw = cell["raw"] if cell["key"] else None
    if isinstance(raw, (int, float)) or (isinstance(raw, str) and len(raw) <= 16):
        return number(raw)
    return ""


def matrix_latex(matrix: Mapping, tier: str = "") -> str:
    """The claims × models matrix (`esa.claims.report_matrix.build_matrix`): one row per claim
    and variant, the key measurement's name, then per model the verdict and its key value."""
    metric = bool(matrix["metric_rows"])
    columns = ["claim", "case", *(["metric"] if metric else []), "key value", *map(escape, matrix["columns"])]
    rows, previous = [], None
    for r in matrix["rows"]:
        keys = " / ".join(dict.fromkeys(c["key"] for c in r["cells"].values() if c["key"]))
        cells = []
        for col in matrix["columns"]:
            c = r["cells"].get(col)
            cells.append("" if c is None else stack(escape(c["verdict"]), _cell_value(c)))
        label = escape(r["label"]) if r["label"] != previous else ""  # a group's label once
        previous = r["label"]
        rows.append(
            [label, escape(r["variant"]), *([escape(r["metric"])] if metric else []), escape(keys), *cells]
        )
    single = "" if metric or not matrix["metrics"] else f", metric {matrix['metrics'][0]}"
    caption = f"Claims × models: verdict and key value (esa{', tier ' + tier if tier else ''}{single})."
    return table_env(tabular(columns, rows), caption, "tab:esa-claims-matrix")


def delta_ppl_latex(rows: list[dict], caption: str | None = None) -> str:
    """The ΔPPL table (`esa.claims.report_tables.delta_ppl_rows`): per model, metric and
    perturbation, each set's ΔPPL with its 95% CI."""
    t = delta_ppl_table(rows, cell=interval, text=escape)
    columns = [escape(c) for c in t["columns"]]
    align = "l" * sum(not c.startswith("ΔPPL") for c in t["columns"]) + "r" * sum(
        c.startswith("ΔPPL") for c in t["columns"]
    )
    caption = caption or (
        "ΔPPL = PPL(perturbed) – PPL(baseline) of each weight set (mean over seeds, "
        "95% CI from a paired bootstrap over evaluation windows)."
    )
    return table_env(tabular(columns, t["rows"], align), caption, "tab:esa-delta-ppl")


def latex_document(*tables: str) -> str:
    """A standalone document holding `tables` (article, T1 fonts, booktabs)."""
    return PREAMBLE + "\\begin{document}\n" + "\n\n".join(tables) + "\n\\end{document}\n"


def latex_tables(matrix: Mapping, delta_rows: list[dict], tier: str = "") -> str:
    """The report's LaTeX file: a comment naming the packages, the matrix, the ΔPPL table (when
    any claim measured ΔPPL)."""
    packages = ",".join(PACKAGES)
    parts = [f"% esa claims tables: \\usepackage{{{packages}}} in the preamble, then \\input this file"]
    if matrix["rows"]:
        parts.append(matrix_latex(matrix, tier))
    if delta_rows:
        parts.append(delta_ppl_latex(delta_rows))
    return "\n\n".join(parts) + "\n"
