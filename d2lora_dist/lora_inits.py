"""How a fresh LoRA adapter's factors are drawn: PEFT's `init_lora_weights` variants, as a grid axis.

This is a different axis from `inits.py` (where a cell's adapter starts: fresh, or the warm-up's).
A vanilla cell draws its fresh adapter with its LoRA init; a D2LoRA cell starts from a warm-up that
itself began with that LoRA init.

`default` (Kaiming A, B = 0) and `gaussian` (Gaussian A, B = 0) leave the base weights alone. PiSSA
and OLoRA are *residual* inits: they take the adapter's starting factors B0, A0 from the base
weight W (SVD, QR) and replace W with the residual W - s * B0 A0, so the model with the adapter
equals the base at step 0 but the model with adapters disabled is not the base any more.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from d2lora_dist.errors import UnknownName

DEFAULT_LORA_INIT = "default"
_PISSA_NITER = re.compile(r"^pissa_niter_(\d+)$")


@dataclass(frozen=True)
class LoraInitSpec:
    label: str  # how tables and plots name it
    peft_value: bool | str  # peft.LoraConfig(init_lora_weights=...)
    residual: bool  # rewrites the base weights (the adapter belongs to one residual base)
    seeded: bool = False  # its residual factors depend on the seed (randomised SVD)


LORA_INITS: dict[str, LoraInitSpec] = {
    DEFAULT_LORA_INIT: LoraInitSpec("default", True, residual=False),
    "gaussian": LoraInitSpec("Gaussian", "gaussian", residual=False),
    "pissa": LoraInitSpec("PiSSA", "pissa", residual=True),
    "olora": LoraInitSpec("OLoRA", "olora", residual=True),
}


def lora_init_spec(name: str) -> LoraInitSpec:
    """The registry entry; `pissa_niter_K` (PiSSA by K-iteration randomised SVD, fast on 8B models) too."""
    if name in LORA_INITS:
        return LORA_INITS[name]
    m = _PISSA_NITER.match(name)
    if m and int(m.group(1)) >= 1:
        return LoraInitSpec(f"PiSSA (niter {m.group(1)})", name, residual=True, seeded=True)
    raise UnknownName(f"unknown LoRA init {name!r} (valid: {', '.join(LORA_INITS)}, pissa_niter_K)")


def is_lora_init(name: str) -> bool:
    try:
        lora_init_spec(name)
    except UnknownName:
        return False
    return True


def lora_init_label(name: str) -> str:
    return lora_init_spec(name).label
