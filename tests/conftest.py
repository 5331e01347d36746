# The Triton interpreter must be switched on before any @triton.jit function is defined.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", deadline=None, max_examples=10)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _private_plan_cache(tmp_path, monkeypatch):
    """Every test gets its own on-disk plan cache, so no test reads another's plans or the user's."""
    monkeypatch.setenv("IOSPARSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCH_IOSPARSE_CACHE", raising=False)  # the old name, an alias


@pytest.fixture(scope="module")
def poison_buffers():
    """Every kernel call fills its output and scratch buffers with NaN first (IOSPARSE_POISON), so an
    element that is read before being written, or never written, fails the comparison. Use with
    ``pytestmark = pytest.mark.usefixtures("poison_buffers")``."""
    old = os.environ.get("IOSPARSE_POISON")
    os.environ["IOSPARSE_POISON"] = "1"
    yield
    if old is None:
        del os.environ["IOSPARSE_POISON"]
    else:
        os.environ["IOSPARSE_POISON"] = old
