"""Data, training loops and evaluation for onemodel."""
