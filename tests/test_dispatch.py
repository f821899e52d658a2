"""Backend selection and argument validation."""
import pytest
import torch

import stvit_kernels as sk
from stvit_kernels.backends import current_backend_name, resolve


def test_reference_always_available():
    assert "reference" in sk.available_backends()


def test_unknown_backend_lists_the_others():
    with pytest.raises(ValueError, match="unknown backend 'nope'.*reference: available"):
        with sk.use_backend("nope"):
            pass
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="unknown backend"):
        sk.stoken_affinity(x, x[:, :, :1, :1], 4, backend="nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_unavailable_backend_says_why():
    with pytest.raises(ValueError, match="backend 'cuda' is not available: .*"):
        with sk.use_backend("cuda"):
            pass


def test_use_backend_nests_and_restores():
    assert current_backend_name() == "auto"
    with sk.use_backend("reference"):
        assert current_backend_name() == "reference"
        with sk.use_backend("auto"):
            assert current_backend_name() == "auto"
        assert current_backend_name() == "reference"
    assert current_backend_name() == "auto"


def test_forced_backend_declining_the_device_raises():
    if "cpu" not in sk.available_backends():
        pytest.skip("the compiled extension is not built")
    x = torch.randn(1, 4, 4, 4, device="meta")
    with pytest.raises(ValueError, match="cannot run this call"):
        resolve(x, "cpu")


def test_explain_names_choice_and_reasons():
    x = torch.randn(1, 8, 8, 8)
    text = sk.explain(x)
    chosen = resolve(x).name
    assert text.splitlines()[0].endswith(f"-> {chosen}")
    assert "reference" in text
    for line in text.splitlines()[1:]:
        assert any(w in line for w in ("chosen", "declined (", "usable", "not tried"))
    assert "forced 'reference'" in sk.explain(x, "reference")


def _xs(B=1, C=4, H=8, W=8, size=4, dtype=torch.float32):
    x = torch.randn(B, C, H, W, dtype=dtype)
    return x, torch.randn(B, C, H // size, W // size, dtype=dtype)


@pytest.mark.parametrize("bad,err,match", [
    (0, ValueError, "positive"), (-2, ValueError, "positive"), ((4, 4, 4), ValueError, "length 3"),
    ((4, 0), ValueError, "positive"), (2.0, TypeError, "int"), (True, TypeError, "int"),
])
def test_bad_stoken_size(bad, err, match):
    x, s = _xs()
    with pytest.raises(err, match=match):
        sk.stoken_affinity(x, s, bad)


def test_bad_shapes_and_dtypes():
    x, s = _xs()
    with pytest.raises(ValueError, match="4-D"):
        sk.stoken_affinity(x[0], s, 4)
    with pytest.raises(ValueError, match=r"stokens.shape=\(1, 4, 3, 2\)"):
        sk.stoken_affinity(x, torch.randn(1, 4, 3, 2), 4)
    with pytest.raises(ValueError, match="divisible by stoken_size"):
        sk.stoken_affinity(torch.randn(1, 4, 9, 8), s, 4)
    with pytest.raises(TypeError, match="floating-point"):
        sk.stoken_affinity(x.long(), s.long(), 4)
    with pytest.raises(TypeError, match="same dtype"):
        sk.stoken_affinity(x, s.double(), 4)
    A = torch.randn(1, 9, 8, 8)
    with pytest.raises(ValueError, match=r"affinity.shape=\(1, 8, 8, 8\)"):
        sk.stoken_aggregate(x, torch.randn(1, 8, 8, 8), 4)
    with pytest.raises(ValueError, match="do not match"):
        sk.stoken_upsample(torch.randn(2, 4, 2, 2), A, 4)
    with pytest.raises(ValueError, match="do not match"):
        sk.stoken_upsample(torch.randn(1, 4, 2, 3), A, 4)
    with pytest.raises(ValueError, match="same device"):
        sk.stoken_aggregate(x, A.to("meta"), 4)
