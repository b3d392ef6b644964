"""Evaluation: task metrics, scoring, report."""
