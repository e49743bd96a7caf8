"""The adaptation grid: cells, running one cell idempotently, executors and status."""
