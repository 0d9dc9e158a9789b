"""lwz: a low-level GRPO trainer reproducing LongWriter-Zero (arXiv 2506.18841)."""

__version__ = "0.1.0"
