"""The inner layers, and the edge-neutral call pipeline, import without gRPC, protobuf or PyMongo
(docs/architecture.md; lint-imports checks the imports one by one, this checks what an import
really loads)."""

from __future__ import annotations

import subprocess
import sys

import pytest

EDGE_PACKAGES = ("grpc", "pymongo", "google.protobuf")


@pytest.mark.parametrize("layer", ["users_grpc.domain", "users_grpc.services", "users_grpc.pipeline"])
def test_a_fresh_interpreter_imports_the_layer_without_grpc_protobuf_or_pymongo(layer: str) -> None:
    # Every module of the layer, not only its package: the package's __init__ imports none of them.
    check = (
        "import importlib, pkgutil, sys\n"
        f"import {layer}\n"
        f"for module in pkgutil.walk_packages({layer}.__path__, prefix='{layer}.'):\n"
        "    importlib.import_module(module.name)\n"
        f"loaded = set({EDGE_PACKAGES!r}) & set(sys.modules)\n"
        "assert not loaded, sorted(loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("layer", ["users_grpc.domain", "users_grpc.services"])
def test_the_layer_package_alone_loads_no_edge_package(layer: str) -> None:
    # The issue's own check, as written.
    check = f"import {layer}, sys; assert not {set(EDGE_PACKAGES)!r} & set(sys.modules)"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
