import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # for `import blocks`


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield
