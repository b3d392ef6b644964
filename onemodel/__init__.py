"""onemodel: one 4M-style any-to-any multimodal model."""

__version__ = "0.1.0"
