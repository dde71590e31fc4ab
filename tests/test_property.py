"""No request, however malformed, gets INTERNAL or UNKNOWN, and the server stays SERVING."""

from __future__ import annotations

import io

import grpc
import pytest
from conftest import TINY, TINY_CONFIG
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from explain_api import explain_pb2, explain_pb2_grpc
from explain_server.engine.quadrature import METHODS
from explain_server.launcher import ServerProcess, wait_serving

pytestmark = pytest.mark.integration

INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
}


def _png(width: int, height: int, color: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (color, 255 - color, color // 2)).save(out, format="PNG")
    return out.getvalue()


images = st.one_of(
    st.binary(max_size=2048),
    st.builds(_png, st.integers(1, 300), st.integers(1, 300), st.integers(0, 255)),
    st.builds(lambda png, cut: png[:cut], st.builds(_png, st.just(64), st.just(64), st.just(9)), st.integers(0, 200)),
)
requests = st.builds(
    explain_pb2.ExplainRequest,
    model=st.one_of(st.just(""), st.just("tiny"), st.text(max_size=40)),
    image=images,
    caption=st.one_of(st.text(max_size=300), st.just("a red circle"), st.just("<end_of_text>!"), st.just(" " * 5)),
    text_layer=st.one_of(st.none(), INT32, st.integers(-3, 3)),
    image_layer=st.one_of(st.none(), INT32, st.integers(-3, 3)),
    n_steps=st.one_of(st.none(), INT32, st.integers(-2, 20)),
    method=st.one_of(st.just(""), st.sampled_from(METHODS), st.text(max_size=30)),
    request_id=st.one_of(st.just(""), st.text(max_size=200)),
)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    server = ServerProcess(
        ["--model-config", str(TINY_CONFIG), "--model", f"tiny={TINY}:random:0", "--max-n-steps", "20"],
        tmp_path_factory.mktemp("logs") / "property.log",
    ).wait_serving()
    yield server
    server.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests)
def test_only_documented_codes(target, request):
    with grpc.insecure_channel(target.target) as channel:
        stub = explain_pb2_grpc.ExplainStub(channel)
        try:
            stub.Explain(request, timeout=60)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as err:
            code, details = err.code(), err.details()
    assert code in DOCUMENTED, (code, details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert details.split(":")[0] in {
            "image",
            "caption",
            "text_layer",
            "image_layer",
            "n_steps",
            "method",
            "request_id",
        }


def test_still_serving_afterwards(target):
    wait_serving(target.target, target.process, timeout=5)
