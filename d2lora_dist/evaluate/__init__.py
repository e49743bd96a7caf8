"""Evaluation: GSM8K / titles / ARC suites, batched generation sharded over ranks, scoring.

Modules (imported explicitly; this package imports nothing so that rescoring a
predictions file does not load torch):
  answers     answer and title extraction from completions (plain functions)
  lm_eval_gsm8k  lm-evaluation-harness's own GSM8K filters and exact match (for comparison)
  scoring     metrics per row, per rows, and per predictions JSONL (`score_file`)
  generation  batched greedy decoding with left padding and stop tokens
  loglik      continuation log-likelihoods for multiple-choice suites
  sharding    data-parallel item split and in-order gather
  suites      versioned prompts and `run_suite`
"""
