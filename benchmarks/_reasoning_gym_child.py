"""Generate (and score) reasoning-gym problems from a wheel extracted at WHEEL_ROOT; standard library only.

    python -I _reasoning_gym_child.py WHEEL_ROOT < request.json > reply.json

Request: {"generator": NAME, "config": {knob: value}, "seed": S, "size": K, "answers": [str|null] | null}.
Reply: {"items": [{"question", "answer", "metadata"}], "scores": [float] | null}; scores[i] is the
generator's own `score_answer(answers[i], item i)`.

Run in a child interpreter by benchmarks/math_task_search.py, never imported: like
d2lora_dist/assets/_gsm_symbolic_child.py it registers the wheel's packages whose __init__ files
import every task family (and their extra dependencies) as bare modules, so that only the task's
own module and the standard library are imported.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from typing import Any

BARE_PACKAGES = ("reasoning_gym", "reasoning_gym.arithmetic", "reasoning_gym.coaching")

# name -> (module under reasoning_gym, dataset class, config class); every one needs the standard
# library only and answers with one number (so the project's number extraction applies).
GENERATORS: dict[str, tuple[str, str, str]] = {
    "basic_arithmetic": ("arithmetic.basic_arithmetic", "BasicArithmeticDataset", "BasicArithmeticDatasetConfig"),
    "chain_sum": ("arithmetic.chain_sum", "ChainSumDataset", "ChainSumConfig"),
    "products": ("arithmetic.products", "ProductsDataset", "ProductsConfig"),
    "leg_counting": ("arithmetic.leg_counting", "LegCountingDataset", "LegCountingConfig"),
    "gcd": ("arithmetic.gcd", "GCDDataset", "GCDConfig"),
    "lcm": ("arithmetic.lcm", "LCMDataset", "LCMConfig"),
    "decimal_chain_sum": ("arithmetic.decimal_chain_sum", "DecimalChainSumDataset", "DecimalChainSumConfig"),
    "decimal_arithmetic": ("arithmetic.decimal_arithmetic", "DecimalArithmeticDataset", "DecimalArithmeticConfig"),
    "count_bits": ("arithmetic.count_bits", "CountBitsDataset", "CountBitsConfig"),
    "gsm_symbolic": ("arithmetic.gsm_symbolic.gsm_symbolic", "GSMSymbolicDataset", "GSMSymbolicDatasetConfig"),
}


def _register_bare_packages(root: str) -> None:
    sys.path.insert(0, root)
    for name in BARE_PACKAGES:
        module = types.ModuleType(name)
        module.__path__ = [root + "/" + name.replace(".", "/")]
        sys.modules[name] = module
    # The task modules import `from ..coaching import BaseCurriculum, RangeAttributeDefinition, ...`:
    # names the bare package does not have. The two submodules that define them need only the
    # standard library (the rest of coaching/ needs yaml), so their names are put on the bare package.
    coaching = sys.modules["reasoning_gym.coaching"]
    for sub in ("attributes", "base_curriculum"):
        for key, value in vars(importlib.import_module(f"reasoning_gym.coaching.{sub}")).items():
            if not key.startswith("_"):
                setattr(coaching, key, value)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def main(root: str) -> None:
    request = json.load(sys.stdin)
    _register_bare_packages(root)
    module_name, dataset_name, config_name = GENERATORS[request["generator"]]
    module = importlib.import_module(f"reasoning_gym.{module_name}")
    config = getattr(module, config_name)(**request["config"], seed=request["seed"], size=request["size"])
    dataset = getattr(module, dataset_name)(config)
    entries = [dataset[i] for i in range(request["size"])]
    answers = request.get("answers")
    scores = None
    if answers is not None:
        scores = [float(dataset.score_answer(a, e)) for a, e in zip(answers, entries, strict=True)]
    items = [{"question": e["question"], "answer": e["answer"], "metadata": _jsonable(e["metadata"])}
             for e in entries]
    json.dump({"items": items, "scores": scores}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
