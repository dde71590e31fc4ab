"""The committed stubs are what ``make proto`` generates from proto/explain/v1/explain.proto."""

import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh():
    result = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_stubs_describe_package_explain_v1():
    from explain_api import explain_pb2

    assert explain_pb2.DESCRIPTOR.package == "explain.v1"
    assert explain_pb2.DESCRIPTOR.name == "explain/v1/explain.proto"
    assert set(explain_pb2.DESCRIPTOR.services_by_name["Explain"].methods_by_name) == {
        "Explain",
        "ExplainMany",
        "ListModels",
    }
