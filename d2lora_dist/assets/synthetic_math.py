"""Synthetic GSM8K-style math as Math-Step-DPO-10K rows: problems from reasoning-gym's gsm_symbolic
(run out of its pinned wheel in a child process), each turned into a step-level preference pair."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

from tqdm.auto import tqdm

from d2lora_dist.assets.errors import AssetError

MATH_ROWS = 1500
MATH_SEED = 0

_RG_WHEEL_PACKAGE = "reasoning_gym/"
_CHILD = Path(__file__).with_name("_gsm_symbolic_child.py")
_GSM_SUFFIX = " Give the result as your final answer. Do not include units."


def gsm_symbolic(archive: Path, work: Path, seed: int, size: int, progress: bool) -> list[dict[str, str]]:
    """Problems {question, answer, cot} from reasoning-gym's gsm_symbolic, run from the wheel extracted
    into `work` by a child interpreter (nothing is installed and this process's sys.path is untouched)."""
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(work, [m for m in zf.namelist() if m.startswith(_RG_WHEEL_PACKAGE) and m.endswith(".py")])
    command = [sys.executable, "-I", str(_CHILD), str(work), str(seed), str(size)]
    examples = []
    # stderr goes to a file: a pipe nobody reads while stdout streams could fill and stall the child.
    with open(work / "stderr.txt", "w+") as errors, \
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True) as proc:
        for line in tqdm(proc.stdout or (), total=size, desc="math_synthetic: generate",
                         disable=not progress, leave=False):
            examples.append(json.loads(line))
        proc.wait()
        errors.seek(0)
        if proc.returncode != 0 or len(examples) != size:
            raise AssetError(f"gsm_symbolic generator from {archive.name} exited {proc.returncode} after "
                             f"{len(examples)}/{size} problems:\n{errors.read()[-2000:]}")
    return examples


# Step-DPO's conventions (xinlai/Math-Step-DPO-10K and its training code): `prompt` is the bare
# question; `initial_reason_steps` is "Let's think step by step.\nStep 1: ...\n...Step k:", ending
# with the header of the step where the two answers diverge; `chosen`/`rejected` are that step's
# text; `full_chosen`/`full_rejected` continue from the same point to the end, so the whole solution
# is initial_reason_steps + full_chosen, ending "The answer is: N" (MetaMath style).
_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")
_RESULT = re.compile(r"=\s*[$£€¥]?\s*(" + _NUMBER.pattern + ")")
_OPERATION = re.compile(r"[-+*/×÷]\s*[$£€¥]?\(?\d|(?<![A-Za-z])x\s*\d|\d\s*\(")
_LIST_MARKER = re.compile(r"^(?:\d+\.|-)\s+")


def math_step_row(question: str, cot: str, answer: str, rng: random.Random) -> dict[str, str]:
    """One Math-Step-DPO-10K row: correct steps up to a seeded arithmetic step k, then that step
    (chosen) against a copy with its result changed (rejected), each continued to a final answer."""
    steps = _cot_steps(cot)
    candidates = [(i, m) for i, s in enumerate(steps) if (m := _arithmetic_result(s)) is not None]
    if not candidates:
        raise AssetError(f"math_synthetic: no arithmetic step to corrupt in {cot!r}")
    k, result = rng.choice(candidates)
    old, new = result.group(1), _shift(result.group(1), rng)
    bad_step = steps[k][: result.start(1)] + new + steps[k][result.end(1):]
    rejected_tail, wrong = _wrong_final([bad_step, *(_propagate(s, old, new) for s in steps[k + 1:])], answer, rng)
    initial = "Let's think step by step." + _numbered(steps[:k], 1) + f"\nStep {k + 1}:"
    return {
        "dataset": "gsm_symbolic",
        "prompt": question.removesuffix(_GSM_SUFFIX),
        "initial_reason_steps": initial,
        "chosen": f" {steps[k]}",
        "rejected": f" {rejected_tail[0]}",
        "full_chosen": f" {steps[k]}{_numbered(steps[k + 1:], k + 2)}\nThe answer is: {answer}",
        "full_rejected": f" {rejected_tail[0]}{_numbered(rejected_tail[1:], k + 2)}\nThe answer is: {wrong}",
        "answer": answer,
    }


def _cot_steps(cot: str) -> list[str]:
    """One step per line of the chain of thought, without '#### N', list markers and the preamble
    some templates add ("Let's solve this step by step:")."""
    lines = [_LIST_MARKER.sub("", line.strip()) for line in cot.split("\n")]
    return [line for line in lines
            if line and not line.startswith("####") and not line.lower().startswith("let's solve this")]


def _arithmetic_result(step: str) -> re.Match[str] | None:
    """The number right after the last '=' of a step that computes something, else None."""
    results = list(_RESULT.finditer(step))
    if not results or not _OPERATION.search(step[: results[-1].start()]):
        return None
    return results[-1]


def _shift(number: str, rng: random.Random) -> str:
    """A different non-negative number written like `number` (same decimals, same grouping)."""
    value = Decimal(number.replace(",", ""))
    decimals = len(number.split(".")[1]) if "." in number else 0
    delta = rng.randint(1, max(2, int(abs(value) // 4)))
    shifted = value - delta if value - delta >= 0 and rng.random() < 0.5 else value + delta
    return format(shifted, f"{',' if ',' in number else ''}.{decimals}f")


def _same_value(a: str, b: str) -> bool:
    return Decimal(a.replace(",", "")) == Decimal(b.replace(",", ""))


def _propagate(step: str, old: str, new: str) -> str:
    """Later steps reuse the corrupted result: carry the error forward like a model would."""
    return re.sub(r"(?<![\d.,])" + re.escape(old) + r"(?![\d]|[.,]\d)", new, step)


def _wrong_final(steps: list[str], answer: str, rng: random.Random) -> tuple[list[str], str]:
    """(steps with a wrong final result, that wrong answer); it never equals `answer`."""
    last = steps[-1]
    result = _arithmetic_result(last)
    if result is not None and not _same_value(result.group(1), answer):
        return steps, result.group(1)  # the propagated error already changed the final result
    wrong = _shift(answer, rng)
    numbers = [m for m in _NUMBER.finditer(last) if _same_value(m.group(), answer)]
    if numbers:
        m = numbers[-1]
        last = last[: m.start()] + wrong + last[m.end():]
    return [*steps[:-1], last], wrong


def _numbered(steps: Sequence[str], first: int) -> str:
    return "".join(f"\nStep {first + i}: {s}" for i, s in enumerate(steps))
