from __future__ import annotations

import pytest
from run_dirs import pipeline_run


@pytest.fixture
def pipeline_dir(tmp_path):
    """A finished SFT → reward → PPO pipeline run directory with every file the report reads."""
    return pipeline_run(tmp_path / "demo")
