"""Registered datasets: hub id, default split, the columns each schema reads, record forms.

A form is how a schema becomes records for one use: `sft` and `preference` for training,
`eval` for an evaluation suite. Every entry can be read from local files instead of the hub.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from d2lora_dist.data import normalize as nz
from d2lora_dist.errors import UnknownName

Normalizer = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    hub_id: str
    hub_config: str | None
    split: str
    required: tuple[str, ...]
    forms: dict[str, Normalizer]
    optional: tuple[str, ...] = ()
    id_column: str | None = None
    notes: str = field(default="")


REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("orpo_dpo_mix", "mlabonne/orpo-dpo-mix-40k", None, "train", ("chosen", "rejected"),
                    {"sft": nz.chat_pair_sft, "preference": nz.chat_pair_preference},
                    notes="chosen/rejected are message lists containing the user turn (warm-up data)"),
        DatasetSpec("alpaca", "tatsu-lab/alpaca", None, "train", ("instruction", "output"),
                    {"sft": nz.alpaca_sft}, optional=("input",)),
        DatasetSpec("math_step_dpo", "xinlai/Math-Step-DPO-10K", None, "train",
                    ("prompt", "chosen", "rejected", "full_chosen"),
                    {"sft": nz.math_step_sft, "preference": nz.math_step_preference},
                    optional=("initial_reason_steps", "full_rejected"),
                    notes="SFT: prompt -> initial_reason_steps + full_chosen; DPO/ORPO (needs full_rejected): "
                          "prompt + initial_reason_steps -> next step or rest of the solution "
                          "(preference_target, docs/preference-targets.md)"),
        DatasetSpec("econ_abstracts", "onurkeles/econ_paper_abstracts", None, "train", ("abstract", "title"),
                    {"sft": nz.title_sft, "preference": nz.title_preference, "eval": nz.title_item},
                    optional=("id", "rejected_title"), id_column="id",
                    notes="abstract -> title; rename columns with `columns: {abstract: ..., title: ...}`. "
                          "DPO/ORPO reject `rejected_title`, else the abstract's opening words"),
        DatasetSpec("gsm8k", "openai/gsm8k", "main", "test", ("question", "answer"),
                    {"eval": nz.gsm8k_item, "sft": nz.gsm8k_sft}),
        DatasetSpec("arc_easy", "allenai/ai2_arc", "ARC-Easy", "test", ("question", "choices", "answerKey"),
                    {"eval": nz.arc_item}, optional=("id",), id_column="id"),
        DatasetSpec("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "test", ("question", "choices", "answerKey"),
                    {"eval": nz.arc_item}, optional=("id",), id_column="id"),
    )
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownName(f"unknown dataset {name!r}; registered: {', '.join(sorted(REGISTRY))}") from None


def supports(name: str, form: str) -> bool:
    """Whether a registered dataset has the form; unknown names are reported elsewhere."""
    spec = REGISTRY.get(name)
    return spec is None or form in spec.forms
