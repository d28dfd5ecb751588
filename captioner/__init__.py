"""captioner: offline-first image and video captioning (Show, Attend and Tell)."""

__version__ = "0.1.0"
