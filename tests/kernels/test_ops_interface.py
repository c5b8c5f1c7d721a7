"""Every backend implements every abstract `Ops` method with the identical signature.

The CPU backend must always import. The CUDA backend is checked whenever
`cupaged.backend.cuda` imports (it may need cupy; without it the CUDA case is skipped).
"""
from __future__ import annotations

import importlib
import inspect

import pytest

from cupaged.backend.ops import Ops

BACKENDS = [
    pytest.param("cupaged.backend.cpu", "CpuOps", "cpu", False, id="cpu"),
    pytest.param("cupaged.backend.cuda", "CudaOps", "cuda", True, id="cuda"),
]
ABSTRACT = sorted(Ops.__abstractmethods__)


def load_backend(module: str, cls_name: str, optional: bool) -> type:
    """Import module.cls_name; an optional backend whose import fails is skipped."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        if not optional:
            raise
        pytest.skip(f"{module} does not import here: {exc}")
    return getattr(mod, cls_name)


def test_ops_has_abstract_methods():
    assert {"paged_attention", "write_kv", "linear", "rotary_embedding"} <= set(ABSTRACT)


@pytest.mark.parametrize("module,cls_name,name,optional", BACKENDS)
def test_backend_implements_every_abstract_method(module, cls_name, name, optional):
    cls = load_backend(module, cls_name, optional)
    assert issubclass(cls, Ops)
    assert not getattr(cls, "__abstractmethods__", None), f"unimplemented: {cls.__abstractmethods__}"
    assert cls.name == name
    for meth in ABSTRACT:
        impl = getattr(cls, meth)
        assert not getattr(impl, "__isabstractmethod__", False), meth


@pytest.mark.parametrize("method", ABSTRACT)
@pytest.mark.parametrize("module,cls_name,name,optional", BACKENDS)
def test_backend_signature_matches_ops(module, cls_name, name, optional, method):
    cls = load_backend(module, cls_name, optional)
    want = inspect.signature(getattr(Ops, method))
    got = inspect.signature(getattr(cls, method))
    assert got == want, f"{cls_name}.{method}{got} != Ops.{method}{want}"
