"""textdistill: distill instruction-tuning text into a few synthetic samples by trajectory matching."""

__version__ = "0.1.0"
