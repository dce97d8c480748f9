"""The examples in the docstrings run, under the installed (namespaced) module names."""
import doctest
import importlib
import pkgutil

import pytest

import titan_fusion.client
import titan_fusion.server

MODULES = sorted(m.name for pkg in (titan_fusion.server, titan_fusion.client)
                 for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
                 if not m.name.endswith(("_pb2", "_pb2_grpc")))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
