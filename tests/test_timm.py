"""timm registration (`stvit._timm`): `import stvit` makes `timm.create_model("stvit_small")` work,
features_only included, in either import order, without importing timm itself. Skipped without
timm (an optional dependency)."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import stvit
from stvit import _timm

timm = pytest.importorskip("timm")

TINY = dict(embed_dim=[16, 24, 32, 40], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], projection=48)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_create_model_by_name():
    assert {"stvit_small", "stvit_base", "stvit_large"} <= set(timm.list_models("stvit_*"))
    model = timm.create_model("stvit_small", pretrained=False, num_classes=10)
    assert isinstance(model, stvit.STViT) and model.num_classes == 10
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in stvit.stvit_small(num_classes=10).parameters())
    assert model.pretrained_cfg["num_classes"] == 10 and model.pretrained_cfg["input_size"] == (3, 224, 224)
    assert timm.data.resolve_data_config({}, model=model)["mean"] == (0.485, 0.456, 0.406)
    small = timm.create_model("stvit_small", num_classes=3, drop_path_rate=0.2, **TINY).eval()
    assert small(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_features_only():
    model = timm.create_model("stvit_base", pretrained=False, features_only=True, out_indices=(1, 2, 3))
    assert model.feature_info.channels() == [192, 384, 512]
    assert model.feature_info.reduction() == [8, 16, 32]
    tiny = timm.create_model("stvit_small", features_only=True, **TINY).eval()
    feats = tiny(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 16, 16, 16), (1, 24, 8, 8), (1, 32, 4, 4), (1, 40, 2, 2)]
    assert tiny.feature_info.channels() == [16, 24, 32, 40]


def test_pretrained_needs_a_local_file(tmp_path):
    with pytest.raises(RuntimeError, match="no downloadable weights for stvit_small.*pretrained_cfg_overlay"):
        timm.create_model("stvit_small", pretrained=True)
    src = stvit.stvit_small(num_classes=1000, **TINY)
    torch.save({"model": src.state_dict()}, tmp_path / "w.pth")
    model = timm.create_model("stvit_small", pretrained=True, num_classes=7, **TINY,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")))
    assert torch.equal(model.layers[0].blocks[0].attn.stoken_refine.qkv.weight,
                       src.layers[0].blocks[0].attn.stoken_refine.qkv.weight)
    assert model.head.out_features == 7                   # a new head for another class count
    other = dict(TINY, embed_dim=[16, 24, 32, 48])
    with pytest.raises(stvit.CheckpointMismatchError, match="does not hold stvit_small weights"):
        timm.create_model("stvit_small", pretrained=True, **other,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")))


def test_import_stvit_first_registers_when_timm_is_imported():
    """`import stvit` does not import timm (seconds of start-up), yet the models appear with timm."""
    out = _python("import sys, stvit\n"
                  "assert 'timm' not in sys.modules\n"
                  "import timm\n"
                  "print(timm.create_model('stvit_small', num_classes=3, embed_dim=[16, 24, 32, 40],"
                  " depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], projection=48).num_classes)")
    assert out == "3"


def test_import_timm_first_registers_at_once(monkeypatch):
    calls = []
    monkeypatch.setattr(_timm, "_register_quietly", lambda: calls.append(1))
    assert "timm" in sys.modules
    _timm.install()                                       # what `import stvit` does after `import timm`
    assert calls == [1]


def test_without_timm_nothing_is_hooked(monkeypatch):
    monkeypatch.delitem(sys.modules, "timm")
    without_ours = [f for f in sys.meta_path if not isinstance(f, _timm._AfterTimmImport)]
    monkeypatch.setattr(sys, "meta_path", without_ours)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "timm" else real(name, *a))
    _timm.install()                                       # timm not installed: no hook
    assert not any(isinstance(f, _timm._AfterTimmImport) for f in sys.meta_path)
    monkeypatch.setattr(importlib.util, "find_spec", real)
    _timm.install()                                       # installed, not imported: one hook
    _timm.install()
    assert sum(isinstance(f, _timm._AfterTimmImport) for f in sys.meta_path) == 1
