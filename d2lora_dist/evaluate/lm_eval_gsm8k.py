"""lm-evaluation-harness's own GSM8K scoring, so a result can stand beside a published lm-eval figure.

The project's `strict` and `flexible` filters (`answers`) read zero-shot chat answers; lm-eval 0.4's
`gsm8k` task (task version 3.0, the same rules from v0.4.2 through v0.4.12) scores a generation so:

strict-match      the FIRST match of `#### (\\-?[0-9\\.\\,]+)`, its group;
flexible-extract  the LAST match of `(-?[$0-9.,]{2,})|(-?[0-9]+)`, its non-empty group;

either stripped of surrounding whitespace, and "[invalid]" when the pattern does not match. Its
`exact_match` then removes from prediction and reference alike, in this order, every ",", every
"$", everything up to the last "#### " and one final "."; lowercases both; and compares the strings.
So "18.0" is not "18", and "..." is a flexible-extract answer. The reference is the whole GSM8K
answer text (its chain of thought and `#### N`), or a bare number as a string.

These rules are lm-eval's, not ours: change nothing here unless lm-eval's `gsm8k` task changes.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Which lm-eval rules these are: reported with the gsm8k metrics (`lm_eval_rules`). Bump the suffix
# if a fix here changes what a completion scores.
LM_EVAL_RULES = "lm-eval-0.4/gsm8k-3.0/v1"
LM_EVAL_INVALID = "[invalid]"  # lm-eval's fallback when a filter's pattern finds nothing

_STRICT_MATCH = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE_EXTRACT = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# exact_match's regexes_to_ignore, applied in this order to prediction and reference
_IGNORED = tuple(re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$"))


def _found(match: str | tuple[str, ...]) -> str:
    # A pattern with several groups yields one tuple per match: the first non-empty group is the match.
    if isinstance(match, tuple):
        match = next((group for group in match if group), LM_EVAL_INVALID)
    return match.strip()


def strict_match(completion: str) -> str:
    """lm-eval's strict-match filter: the number after the first `#### `, else "[invalid]"."""
    matches = _STRICT_MATCH.findall(completion)
    return _found(matches[0]) if matches else LM_EVAL_INVALID


def flexible_extract(completion: str) -> str:
    """lm-eval's flexible-extract filter: the last number-like run of the text, else "[invalid]"."""
    matches = _FLEXIBLE_EXTRACT.findall(completion)
    return _found(matches[-1]) if matches else LM_EVAL_INVALID


LM_EVAL_FILTERS: dict[str, Callable[[str], str]] = {"strict_match": strict_match,
                                                    "flexible_extract": flexible_extract}


def _normalised(text: str) -> str:
    for pattern in _IGNORED:
        text = pattern.sub("", text)
    return text.lower()  # ignore_case: true; ignore_punctuation: false


def exact_match(prediction: str, reference: str | int | float) -> bool:
    """lm-eval's exact_match with the gsm8k task's settings (a bare numeric reference is read as its
    string, as lm-eval casts the target to the prediction's type)."""
    return _normalised(prediction) == _normalised(str(reference))


def lm_eval_row_scores(completion: str, reference: str | int | float) -> dict[str, str | bool]:
    """`extracted_<filter>` and `correct_<filter>` of one completion for both lm-eval filters."""
    fields: dict[str, str | bool] = {}
    for name, extract in LM_EVAL_FILTERS.items():
        extracted = extract(completion)
        fields[f"extracted_{name}"] = extracted
        fields[f"correct_{name}"] = exact_match(extracted, reference)
    return fields
