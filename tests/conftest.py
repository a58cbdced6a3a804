import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.manual_seed(0)


@pytest.fixture(scope="session")
def v3_model(tmp_path_factory):
    import models

    path = tmp_path_factory.mktemp("v3")
    return path, models.build("v3", path, seed=1)


@pytest.fixture(scope="session")
def v2_lite_model(tmp_path_factory):
    import models

    path = tmp_path_factory.mktemp("v2lite")
    return path, models.build("v2_lite", path, seed=2)
