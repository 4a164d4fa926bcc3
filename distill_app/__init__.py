"""distill: turn a paid image-classification API into a small local student."""

__version__ = "0.1.0"
