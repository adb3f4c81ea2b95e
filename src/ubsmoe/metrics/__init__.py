"""Metrics the engine records for every method: expert balance (and, later, cost)."""
