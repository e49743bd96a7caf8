"""Datasets: registry (hub id or local files -> normalised records), subsets, bad-row policy."""
