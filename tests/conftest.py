import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_addoption(parser):
    parser.addoption('--device', default='cpu',
                     help="torch's default device for the model tests, e.g. cuda "
                          "(pytest --device cuda tests/test_models.py tests/test_wide.py); TF32 is turned off "
                          "so the float32 tolerances hold")


def pytest_configure(config):
    if os.environ.get('PYTEST_XDIST_WORKER'):  # make test's two workers: one thread each, as two threads each
        os.environ['OMP_NUM_THREADS'] = '1'  # contend for 2 cores (docs/performance.md, the test suite)
        import torch
        torch.set_num_threads(1)
    device = config.getoption('--device')
    if device != 'cpu':
        import torch
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_default_device(device)


@pytest.fixture
def float64():
    """float64 as the default dtype, for tests where exactness is the point."""
    import torch
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)
