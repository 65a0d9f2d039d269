"""marsctl: the MARS-Sep toolkit (query-conditioned sound separation with RL fine-tuning)."""

__version__ = "0.1.0"
