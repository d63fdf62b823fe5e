"""Package data: the embedded tiny model, built by `scripts/pretrain_tiny.py`."""

from pathlib import Path

TINY_MODEL = "nanopost-tiny"  # the short name of the model shipped here
TINY_MODEL_PATH = Path(__file__).parent / "tiny"
