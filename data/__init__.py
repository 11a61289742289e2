"""Embedded demo data (see landmarks-dev/ATTRIBUTION.md)."""
from pathlib import Path

LANDMARKS_DEV = Path(__file__).resolve().parent / "landmarks-dev"
