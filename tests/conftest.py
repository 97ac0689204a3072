import os

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter; it must be switched on before triton is
# imported, and only where there is no GPU to run them for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def _id_seed(item) -> int:
    from longkernels.testing import case_seed
    return case_seed(item.nodeid)


@pytest.fixture
def seed(request) -> int:
    """A seed made of the test's id (longkernels.testing.case_seed): the same in every run and process,
    different for every case."""
    return _id_seed(request.node)


@pytest.fixture(autouse=True)
def _seed_global_rng(request):
    """Every test starts with torch's global RNG seeded from its id, so draws it does not seed itself are
    reproducible too; a failure prints the seed (below)."""
    torch.manual_seed(_id_seed(request.node))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("seed", f"torch's global RNG (and the `seed` fixture) started from "
                                        f"{_id_seed(item)} = case_seed({item.nodeid!r}); cases that seed "
                                        "their own draws print those seeds in the assertion"))


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected: shard what is left
def pytest_collection_modifyitems(config, items):
    """``LONGKERNELS_TEST_SHARD=i/n`` keeps every n-th test from the i-th (0-based): ``make gpu-check`` runs
    the GPU tests as n processes side by side, so that the Triton kernels of different shapes compile on
    different cores (one process compiles one kernel at a time)."""
    shard = os.environ.get("LONGKERNELS_TEST_SHARD")
    if not shard:
        return
    try:
        index, count = (int(x) for x in shard.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError):
        raise pytest.UsageError(f"LONGKERNELS_TEST_SHARD={shard!r}: expected i/n with 0 <= i < n") from None
    kept = [item for k, item in enumerate(items) if k % count == index]
    config.hook.pytest_deselected(items=[item for k, item in enumerate(items) if k % count != index])
    items[:] = kept
