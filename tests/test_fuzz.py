"""Random valid configurations (hypothesis): forward and gradients vs the reference."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import Case, check_against_oracle


@st.composite
def cases(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    # Smallest input that still gives a non-empty output for this geometry.
    min_h = max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0])
    min_w = max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1])
    h = draw(st.integers(min_h, min_h + 6))
    w = draw(st.integers(min_w, min_w + 6))
    n = draw(st.integers(1, 3))
    training = draw(st.booleans()) and n * h * w > 1
    return Case(n=n, c=draw(st.integers(1, 20)), h=h, w=w, k=draw(st.integers(1, 20)), kernel=(kh, kw),
                stride=stride, padding=padding, dilation=dilation, bias=draw(st.booleans()),
                residual=draw(st.booleans()), training=training, channels_last=draw(st.booleans()),
                affine=draw(st.booleans()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cases(), seed=st.integers(0, 2**31 - 1))
def test_random_configurations(backend, device, dtype, case, seed):
    check_against_oracle(case, dtype, backend, device, seed)
