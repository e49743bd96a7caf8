"""Answer extraction: from a model completion to the string a metric compares.

GSM8K answers are compared as canonical number strings ("18", "-3", "0.5"), so
"$1,234.50", "1234.5" and "1234.50 dollars" are one answer. Extraction tries the
explicit answer markers first, in this priority order (most to least explicit):

1. `#### N`               the GSM8K gold format; fine-tuned models imitate it
2. `\\boxed{N}`           the LaTeX convention of math-tuned models
3. "the final answer is N"
4. "the answer is N" / "answer: N"   what our zero-shot prompt asks for
5. the last number anywhere in the completion (fallback)

Within one marker the FIRST occurrence wins: text after a model's first conclusive
answer is usually run-on (a hallucinated next question with its own answer), and
the first marker is what the prompt asked for.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number as people write it: optional sign and currency, thousands separators only
# when every group has exactly three digits (so "1,2,3" is three numbers), optional
# decimals. A sentence-final period is not a decimal point (decimals need a digit).
# A minus sign counts only when it touches the number ("-3", "-$3", "$-3") and does
# not follow a word character: "3-5 days" and "20 - 12" do not contain "-5" or "-12".
_NUMBER = re.compile(
    r"(?:\$\s?)?(?:(?<![\w)\]])(?P<sign>[-−]))?(?:\$\s?)?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)
_HASHES = re.compile(r"####")
_BOXED = re.compile(r"\\boxed\s*\{")
_FINAL_ANSWER = re.compile(r"final\s+answer\s*(?:is|:|=)", re.IGNORECASE)
_ANSWER = re.compile(r"answer\s*(?:is|:|=)", re.IGNORECASE)


def canonical_number(text: str) -> str | None:
    """Canonical form of a written number ("$1,234.50" -> "1234.5"), or None.

    Decimal (not float) so large integers and decimals compare exactly and
    18.0 == 18 == 18.00 without rounding surprises.
    """
    match = _NUMBER.search(text)
    return _canonical(match) if match else None


def _canonical(match: re.Match[str]) -> str | None:
    digits = match.group("num").replace(",", "")
    try:
        value = Decimal(digits)
    except InvalidOperation:
        return None
    if match.group("sign") and value != 0:
        value = -value
    # normalize() drops trailing zeros; format "f" keeps 1800 from becoming 1.8E+3.
    return format(value.normalize(), "f")


def _boxed_contents(text: str, start: int) -> str:
    """The text inside the braces of `\\boxed{...}` starting at `start`, nesting-aware."""
    depth, i = 1, start
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[start : i - 1] if depth == 0 else text[start:]


def _after_marker(pattern: re.Pattern[str], text: str) -> str | None:
    """First number after the first occurrence of a marker, on the same line (or the
    next one when the marker ends its line: "The answer is:\n18")."""
    for marker in pattern.finditer(text):
        line = text[marker.end() :].lstrip().split("\n", 1)[0]
        number = canonical_number(line)
        if number is not None:
            return number
    return None


def extract_answer(completion: str) -> str | None:
    """The canonical number a completion answers, or None when it has no number."""
    completion = completion.replace("{,}", ",")  # LaTeX thousands separator: 1{,}234
    # Priority 1: "#### N" (GSM8K gold format).
    number = _after_marker(_HASHES, completion)
    if number is not None:
        return number
    # Priority 2: \boxed{N}; the braces delimit the answer, so search only inside them.
    for boxed in _BOXED.finditer(completion):
        number = canonical_number(_boxed_contents(completion, boxed.end()))
        if number is not None:
            return number
    # Priorities 3 and 4: phrases; "final answer" first, since "the answer is" may
    # appear in intermediate reasoning before the final statement.
    for pattern in (_FINAL_ANSWER, _ANSWER):
        number = _after_marker(pattern, completion)
        if number is not None:
            return number
    # Priority 5: the last number written (chain-of-thought ends with the result).
    numbers = list(_NUMBER.finditer(completion))
    return _canonical(numbers[-1]) if numbers else None


def reference_answer(reference: str) -> str:
    """Canonical gold number from a GSM8K answer text ("... #### 1,234") or a bare number."""
    text = str(reference)
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    number = canonical_number(tail)
    if number is None:
        raise ValueError(f"GSM8K reference has no number after '####' or as a bare value: {text[-200:]!r}")
    return number


def is_correct(completion: str, reference: str) -> bool:
    """Whether the completion's extracted number equals the reference's (canonical strings)."""
    extracted = extract_answer(completion)
    return extracted is not None and extracted == reference_answer(reference)


# --- titles ---------------------------------------------------------------------------

_TITLE_PREFIX = re.compile(r"^\s*(?:\*\*)?\s*title\s*(?:\*\*)?\s*:\s*(?:\*\*)?", re.IGNORECASE)
_TITLE_QUOTES = "\"'“”‘’*` "


def extract_title(completion: str) -> str:
    """The title a completion proposes: its first non-empty line, without a "Title:"
    label or wrapping quotes/markdown.

    Models often add a label or an explanation after the title; both would count as
    wrong words for ROUGE although the title itself is right.
    """
    lines = [line for line in completion.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    title = _TITLE_PREFIX.sub("", lines[0])
    if not title.strip(_TITLE_QUOTES) and len(lines) > 1:
        title = lines[1]  # "Title:" alone on its line, the title on the next one
    return title.strip().strip(_TITLE_QUOTES).strip()
