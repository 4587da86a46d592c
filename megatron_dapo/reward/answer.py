"""Answer extraction and Minerva-style normalisation for the DAPO math reward.

Every step is a left-to-right scan, a literal replace or a fixed-length regex: linear time on any input,
no pattern that can backtrack, no eval. Where this departs from the reference (verl's math_dapo.py, and
Minerva's normaliser):
- a trailing period is dropped ("Answer: 25." matches 25; the reference scores it wrong);
- commas are dropped only when they group thousands ("1,000" -> "1000"; "1,2" stays a list, not 12);
- integers compare as integers ("025" equals "25", "-0" equals "0");
- an "Answer:" with nothing after it on its line is skipped rather than read as an empty answer;
- strings are treated as one line (the reference's regexes stop at newlines; answers are one line).
"""

import re

ANSWER_WINDOW_CHARS = 300  # the reference reads only the response's tail: the answer line is at the end

_ANSWER_KEYWORD = re.compile("answer", re.IGNORECASE)

# Minerva (Lewkowycz et al., 2022, appendix) literal rewrites, applied in order.
_SUBSTITUTIONS = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)
# Units and filler that Minerva deletes wherever they occur.
_REMOVED = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
    "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
    "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
    ",\\!", "{,}", '"', "\\dots",
)  # fmt: skip
_UNWRAPPED_MACROS = ("\\text{", "\\textbf{", "\\overline{")
# \fracab -> \frac{a}{b}, \sqrta -> \sqrt{a}: fixed-length patterns, so each match attempt is O(1).
_FRAC_SHORTHAND = re.compile(r"frac([^{])(.)", re.DOTALL)
_SQRT_SHORTHAND = re.compile(r"sqrt([^{])", re.DOTALL)


def find_answer_line(text: str) -> str | None:
    """What follows the last `Answer:` (any case; whitespace allowed around the colon) up to the end of its
    line, scanning left to right as a regex findall would. None when there is no such line."""
    last = None
    pos = 0
    for match in _ANSWER_KEYWORD.finditer(text):
        if match.start() < pos:
            continue  # inside an answer already taken, as findall's non-overlapping matches
        i = match.end()
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text) or text[i] != ":":
            continue
        i += 1
        while i < len(text) and text[i].isspace():
            i += 1
        end = text.find("\n", i)
        end = len(text) if end < 0 else end
        if end > i:
            last, pos = text[i:end], end
    return last


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced; None when there is none or it never closes."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len("\\boxed"), len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{") : i]
    return None


def extract_answer(response: str, *, boxed_fallback: bool = False) -> str | None:
    """The raw answer in the response's last ANSWER_WINDOW_CHARS characters: the last Answer line, else (when
    `boxed_fallback`) the last \\boxed{} content, else None."""
    window = response[-ANSWER_WINDOW_CHARS:]
    answer = find_answer_line(window)
    if answer is None and boxed_fallback:
        answer = last_boxed(window)
    return answer


def _first_dollar_span(s: str) -> str:
    """Keep only the first $...$ span, as "$...$"; unchanged when there are fewer than two dollars."""
    i = s.find("$")
    j = s.find("$", i + 1) if i >= 0 else -1
    return s if j < 0 else "$" + s[i + 1 : j] + "$"


def _unwrap_lazy(s: str, macro: str) -> str:
    """Replace each `macro...}` (up to the first closing brace) by its content."""
    out, pos = [], 0
    while (i := s.find(macro, pos)) >= 0 and (j := s.find("}", i + len(macro))) >= 0:
        out += [s[pos:i], s[i + len(macro) : j]]
        pos = j + 1
    out.append(s[pos:])
    return "".join(out)


def _unwrap_boxed(s: str) -> str:
    """Replace `\\boxed{` ... the last `}` by its content."""
    i = s.find("\\boxed{")
    j = s.rfind("}")
    if i < 0 or j < i + len("\\boxed{"):
        return s
    return s[:i] + s[i + len("\\boxed{") : j] + s[j + 1 :]


def _is_ascii_integer(s: str) -> bool:
    digits = s[1:] if s.startswith("-") else s
    return digits.isascii() and digits.isdigit()


def _drop_thousands_commas(s: str) -> str:
    """ "1,000,000" -> "1000000"; anything else (a list "1,2", "1,00") unchanged."""
    groups = (s[1:] if s.startswith("-") else s).split(",")
    if len(groups) < 2 or not all(_is_ascii_integer(g) and not g.startswith("-") for g in groups):
        return s
    if not (1 <= len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:])):
        return s
    return s.replace(",", "")


def normalize_answer(text: str) -> str:
    """Minerva-style normal form: what follows the last "=", without units, text wrappers, \\boxed{}, $...$
    and thousands commas; integers in canonical form (no leading zeros, no "-0")."""
    s = text.rpartition("=")[2]
    for before, after in _SUBSTITUTIONS:
        s = s.replace(before, after)
    for removed in _REMOVED:
        s = s.replace(removed, "")
    s = _first_dollar_span(s)
    for macro in _UNWRAPPED_MACROS:
        s = _unwrap_lazy(s, macro)
    s = _unwrap_boxed(s)
    s = _FRAC_SHORTHAND.sub(r"frac{\1}{\2}", s)
    s = _SQRT_SHORTHAND.sub(r"sqrt{\1}", s)
    s = s.replace("$", "").strip().rstrip(".")
    s = _drop_thousands_commas(s)
    if _is_ascii_integer(s):
        negative = s.startswith("-")
        digits = s.lstrip("-").lstrip("0") or "0"
        s = "-" + digits if negative and digits != "0" else digits
    return s
