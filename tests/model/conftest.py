"""The real default model (SmolLM2-135M-Instruct Q4_1), fetched and exported once per cache."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "reference_smollm2.json"


@pytest.fixture(scope="session")
def default_model() -> Path:
    from onnx_export.export import default_model_dir, export_model

    return export_model(None, default_model_dir(), ranges="0-15,15-30", progress=False).directory


@pytest.fixture(scope="session")
def reference() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())  # type: ignore[no-any-return]
