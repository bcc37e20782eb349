"""The test data in tests/data: real HL7 v2 samples, their sources and licences (tests/data/hl7/README.md)."""
from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
HL7_SAMPLES = DATA / "hl7"
