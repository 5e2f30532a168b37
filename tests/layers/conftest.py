"""Fixtures of the layer tests: the native CPU kernels."""
import pytest

from dynconv_mm.layers import native


@pytest.fixture
def lib():
    """The compiled native library; a machine without a C compiler skips (there the PyTorch paths run)."""
    if native._compiler() is None:
        pytest.skip('no C compiler on this machine: the native kernels cannot be built')
    library = native.native_library()
    assert library is not None, native.native_status()  # a compiler is there: the build must work
    return library


@pytest.fixture
def native_calls(monkeypatch):
    """``watch(name) -> calls``: records, per call of ``native.<name>``, whether it computed a result
    (``False``: it declined)."""

    def watch(name):
        calls = []
        original = getattr(native, name)

        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            calls.append(out is not None)
            return out

        monkeypatch.setattr(native, name, wrapped)
        return calls

    return watch
