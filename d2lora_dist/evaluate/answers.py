"""Answer extraction: from a model completion to the string a metric compares.

GSM8K answers are compared as canonical number strings ("18", "-3", "0.5"), so
"$1,234.50", "1234.5" and "1234.50 dollars" are one answer. Two filters turn a
completion into a number, and every GSM8K evaluation reports both (docs/evaluation.md):

strict    the answer after the LAST explicit answer marker, None without one. Markers:
          `#### N` (the GSM8K gold format), `\\boxed{N}`, "the final answer is N" /
          "final answer: N", "the answer is N" / "answer: N".
flexible  the strict answer when there is one, else the last number anywhere.

Why the last marker and not the first: a model often restates or corrects itself
("The answer is 5 ... wait, ... The answer is 7"), and our prompt (d2lora_dist.prompts)
asks for a LAST line "The answer is N"; the final statement is the one it means.
A marker whose text holds no number (a copied placeholder "The answer is N.") does not
count as a marker.

After a marker the answer is the last number of its segment: the text up to the end of
that sentence or line (in `\\boxed{...}`: the braces). "The answer is 5 + 3 = 8." ends
on its result, 8, and "The answer is $18. Then 4 more" stops at the sentence, 18.

Bump ANSWER_RULES_VERSION whenever what these functions return changes: accuracies from
different rules are not comparable, and the gsm8k suite reports the version with its
metrics (`answer_rules`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Literal

from d2lora_dist.errors import InputError

ANSWER_RULES_VERSION = "gsm8k-answers-v2"  # v1: first marker by priority, first number after it

AnswerFilter = Literal["strict", "flexible"]

# A number as people write it: optional sign and currency, thousands separators only
# when every group has exactly three digits (so "1,2,3" is three numbers), optional
# decimals. A sentence-final period is not a decimal point (decimals need a digit).
# A minus sign counts only when it touches the number ("-3", "-$3", "$-3") and does
# not follow a word character: "3-5 days" and "20 - 12" do not contain "-5" or "-12".
_NUMBER = re.compile(
    r"(?:\$\s?)?(?:(?<![\w)\]])(?P<sign>[-−]))?(?:\$\s?)?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)
# Every marker kind in one pattern, so finditer yields them in text order and "final
# answer is" is one marker, not also an "answer is" inside it. Markdown bold may close
# the phrase before its colon ("**Final Answer**: 18") or after it ("**Answer:** 18").
_MARKER = re.compile(
    r"####|(?P<boxed>\\boxed\s*\{)|\b(?:final\s+)?answer\**\s*(?:is\b(?:\s*:)?|:|=)",
    re.IGNORECASE,
)
# A segment ends at a line break or a sentence end; a period followed by a digit is a
# decimal point ("$18.50"), not a sentence end.
_SEGMENT_END = re.compile(r"\n|[.!?](?!\d)")
_SEGMENT_LEAD = " \t\r\n*"  # skipped before a segment starts: line breaks, markdown bold


def canonical_number(text: str) -> str | None:
    """Canonical form of the first written number in `text` ("$1,234.50" -> "1234.5"), or None.

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


def _last_number(text: str) -> str | None:
    """Canonical form of the last written number in `text`, or None."""
    numbers = list(_NUMBER.finditer(text))
    return _canonical(numbers[-1]) if numbers else None


def _boxed_contents(text: str, start: int) -> str:
    """The text inside the braces of `\\boxed{...}` starting at `start`, nesting-aware."""
    depth, i = 1, start
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[start : i - 1] if depth == 0 else text[start:]


def _segment(text: str, marker: re.Match[str]) -> str:
    """The text a marker answers with: the braces of `\\boxed{`, else the rest of the
    sentence or line (the next line when the marker ends its line: "The answer is:\\n18")."""
    if marker.group("boxed"):
        return _boxed_contents(text, marker.end())
    rest = text[marker.end() :].lstrip(_SEGMENT_LEAD)
    end = _SEGMENT_END.search(rest)
    return rest[: end.start()] if end else rest


def _normalise(completion: str) -> str:
    return completion.replace("{,}", ",")  # LaTeX thousands separator: 1{,}234


def extract_strict(completion: str) -> str | None:
    """The last number of the last answer marker's segment that holds one; None when no
    marker in the completion is followed by a number."""
    text = _normalise(completion)
    for marker in reversed(list(_MARKER.finditer(text))):
        number = _last_number(_segment(text, marker))
        if number is not None:
            return number
    return None


def extract_flexible(completion: str) -> str | None:
    """The strict answer, else the last number anywhere (chain-of-thought ends with the
    result); None only when the completion has no number at all."""
    strict = extract_strict(completion)
    return strict if strict is not None else _last_number(_normalise(completion))


ANSWER_FILTERS: dict[str, Callable[[str], str | None]] = {"strict": extract_strict, "flexible": extract_flexible}


def answer_extractor(name: str) -> Callable[[str], str | None]:
    """The extraction function of a filter name, or a ValueError listing the valid names."""
    if name not in ANSWER_FILTERS:
        raise InputError(f"answer_filter must be one of {sorted(ANSWER_FILTERS)}, got {name!r}")
    return ANSWER_FILTERS[name]


def reference_answer(reference: str) -> str:
    """Canonical gold number from a GSM8K answer text ("... #### 1,234") or a bare number."""
    text = str(reference)
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    number = canonical_number(tail)
    if number is None:
        raise InputError(f"GSM8K reference has no number after '####' or as a bare value: {text[-200:]!r}")
    return number


def is_correct(completion: str, reference: str, answer_filter: AnswerFilter = "flexible") -> bool:
    """Whether the filter's extracted number equals the reference's (canonical strings)."""
    extracted = answer_extractor(answer_filter)(completion)
    return extracted is not None and extracted == reference_answer(reference)


# --- titles ---------------------------------------------------------------------------

# Bump TITLE_RULES_VERSION whenever what extract_title returns changes: ROUGE from different
# rules is not comparable, and the titles suite reports it as its scorer version.
# v1 (results that record no scorer version): the first non-empty line, its "Title:" label
# removed, so a preamble ("Here is a title for the paper:") was scored as the title.
TITLE_RULES_VERSION = "titles-extract-v2"

# A lead-in that announces the title instead of giving it: "Sure! Here is a concise title for the
# paper:", "Here's a possible title:", "A suitable title would be:". Only a line that starts so AND
# names a title counts, so a title such as "Here Is Why Banks Fail" is kept.
_LEAD_IN = re.compile(
    r"^(?:(?:sure|certainly|of course|okay|ok|absolutely|great)\b[\s!,.]*)?"
    r"(?:here\s+is|here's|here\s+are|below\s+is|i\s+(?:would\s+)?(?:suggest|propose)|"
    r"(?:a|one|my|the)\s+(?:possible|suitable|good|concise|short|proposed|suggested|fitting)\s+titles?)\b",
    re.IGNORECASE)
_INTERJECTION = re.compile(r"^(?:sure|certainly|of course|okay|ok|absolutely|great)\W*$", re.IGNORECASE)
_TITLE_WORD = re.compile(r"\btitles?\b", re.IGNORECASE)
_TITLE_LABEL = re.compile(r"^\s*(?:\*\*)?\s*(?:suggested\s+|proposed\s+|paper\s+)?title\s*(?:\*\*)?\s*:\s*(?:\*\*)?",
                          re.IGNORECASE)
_TITLE_QUOTES = "\"'“”‘’*` "


def _unwrap(text: str) -> str:
    """Without surrounding whitespace, quotes, markdown emphasis or a heading mark."""
    return re.sub(r"^\s*#+\s+", "", text).strip().strip(_TITLE_QUOTES).strip()


def _is_lead_in(line: str) -> bool:
    bare = line.lstrip(_TITLE_QUOTES + "#")
    return bool(_LEAD_IN.match(bare)) and bool(_TITLE_WORD.search(bare))


def extract_title(completion: str) -> str:
    """The title a completion proposes (docs/evaluation.md, rules TITLE_RULES_VERSION).

    Lines before the title that only announce it ("Sure!", "Here is a concise title for the
    paper:") are skipped; text after the announcement's colon on the same line is the title.
    From the first remaining line, a "Title:" label (plain or markdown bold) is removed, and
    when the label stands alone the next line is the title; wrapping quotes, markdown emphasis
    and a heading mark go. Everything after that line (an explanation) is ignored. "" when the
    completion holds no title.
    """
    lines = [line.strip() for line in completion.splitlines() if line.strip()]
    i = 0
    while i < len(lines):
        line = lines[i]
        if _INTERJECTION.match(_unwrap(line)):
            i += 1
            continue
        if _is_lead_in(line):
            _, colon, rest = line.partition(":")
            if colon and _unwrap(_TITLE_LABEL.sub("", rest)):
                return _unwrap(_TITLE_LABEL.sub("", rest))
            i += 1
            continue
        break
    if i >= len(lines):
        return ""
    title = _unwrap(_TITLE_LABEL.sub("", lines[i]))
    if not title and i + 1 < len(lines):
        title = _unwrap(lines[i + 1])  # "Title:" alone on its line, the title on the next one
    return title


def is_bare_title(completion: str) -> bool:
    """Whether the completion is its title and nothing else: one line, no lead-in, no label, no
    quotes or markdown around it, no explanation after it (surrounding whitespace aside)."""
    title = extract_title(completion)
    return bool(title) and completion.strip() == title
