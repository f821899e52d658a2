"""The STViT model (`stvit`): shapes, configurations, official parameter names, checkpoint loading,
features_only mode and an end-to-end backward. Parity of the numbers with the official code is
checked outside CI (it needs the official repository); here the model is checked against itself and
against the official naming."""
import argparse

import pytest
import torch

import stvit
from stvit.model import DropPath, STViT

from .utils import seed_for

# The official state dict also holds these two constant identity kernels in every block.
CONSTANT_SUFFIXES = ("attn.unfold.weights", "attn.fold.weights")


def _tiny(**kwargs):
    """A 4-stage STViT with one small block per stage, for tests that do not need a real config."""
    cfg = dict(embed_dim=[16, 24, 32, 40], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
               stoken_size=[8, 4, 1, 1], projection=48, num_classes=10, layerscale=[False, True, False, True])
    cfg.update(kwargs)
    return STViT(**cfg)


@torch.no_grad()
def _randomise(model, seed):
    """Make every parameter and BN statistic differ from a fresh model's (so loading is visible)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=g))
        elif name.endswith("num_batches_tracked"):
            b.fill_(7)


def _official_state_dict(model):
    """``model``'s state dict as the official code would save it: with the two constant identity
    kernels ``(9, 1, 3, 3)`` of every block's attention."""
    sd = dict(model.state_dict())
    eye = torch.eye(9).reshape(9, 1, 3, 3)
    for name, _ in model.named_modules():
        if name.endswith(".attn"):
            for suffix in ("unfold.weights", "fold.weights"):
                sd[f"{name}.{suffix}"] = eye.clone()
    return sd


@pytest.fixture(scope="module")
def small_eval():
    torch.manual_seed(seed_for("small_eval"))
    return stvit.stvit_small().eval()


# ----------------------------------------------------------------------------------------------
# Shapes and configurations
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,H,W", [pytest.param(1, 224, 224, id="B1-224x224"),
                                   pytest.param(2, 200, 232, id="B2-200x232-not-multiple-of-32")])
def test_small_forward_shape(small_eval, B, H, W):
    torch.manual_seed(seed_for("fwd", B, H, W))
    with torch.no_grad():
        y = small_eval(torch.randn(B, 3, H, W))
    assert y.shape == (B, 1000)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name,millions", [("stvit_small", 25.5), ("stvit_base", 51.7),
                                           ("stvit_large", 95.0)])
def test_parameter_counts(name, millions):
    with torch.device("meta"):
        model = getattr(stvit, name)()
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 1) == millions, f"{name}: {n} parameters"
    assert all(p.requires_grad for p in model.parameters())


def test_official_parameter_names():
    with torch.device("meta"):
        small, base = stvit.stvit_small(), stvit.stvit_base()
    ks, kb = small.state_dict(), base.state_dict()
    expected_small = {
        "patch_embed.proj.0.weight": (32, 3, 3, 3),
        "patch_embed.proj.2.running_var": (32,),
        "patch_embed.proj.3.weight": (32, 32, 3, 3),
        "patch_embed.proj.6.weight": (64, 32, 3, 3),
        "patch_embed.proj.9.weight": (64, 64, 3, 3),
        "patch_embed.proj.11.num_batches_tracked": (),
        "layers.0.blocks.0.pos_embed.conv.weight": (64, 1, 3, 3),
        "layers.0.blocks.0.norm1.norm.weight": (64,),
        "layers.0.blocks.2.attn.stoken_refine.qkv.weight": (192, 64, 1, 1),
        "layers.0.blocks.2.attn.stoken_refine.qkv.bias": (192,),
        "layers.0.blocks.2.attn.stoken_refine.proj.bias": (64,),
        "layers.1.blocks.4.norm2.running_mean": (128,),
        "layers.1.blocks.4.mlp2.fc1.weight": (512, 128, 1, 1),
        "layers.1.blocks.4.mlp2.conv.conv.weight": (512, 1, 3, 3),
        "layers.1.blocks.4.mlp2.fc2.weight": (128, 512, 1, 1),
        "layers.0.downsample.proj.0.weight": (128, 64, 3, 3),
        "layers.2.downsample.proj.1.running_var": (512,),
        "layers.3.blocks.2.attn.stoken_refine.qkv.weight": (1536, 512, 1, 1),
        "proj.weight": (1024, 512, 1, 1),
        "norm.running_mean": (1024,),
        "head.weight": (1000, 1024),
        "head.bias": (1000,),
    }
    for key, shape in expected_small.items():
        assert key in ks, key
        assert tuple(ks[key].shape) == shape, (key, tuple(ks[key].shape), shape)
    # the Sequential indices of the stem: conv at 0, 3, 6, 9; BN at 2, 5, 8, 11; GELUs hold nothing
    stem = {int(k.split(".")[2]) for k in ks if k.startswith("patch_embed.proj.")}
    assert stem == {0, 2, 3, 5, 6, 8, 9, 11}
    assert not any(k.startswith("layers.3.downsample") for k in ks)
    assert not any("gamma" in k or "unfold" in k or "fold" in k for k in ks)
    assert set(k.split(".")[0] for k in ks) == {"patch_embed", "layers", "proj", "norm", "head"}
    # layer scale: base has it in stages 3-4 only, initialised to 1e-6
    for key, shape in {"layers.2.blocks.0.gamma_1": (1, 384, 1, 1),
                       "layers.3.blocks.5.gamma_2": (1, 512, 1, 1)}.items():
        assert tuple(kb[key].shape) == shape
    assert not any("gamma" in k for k in kb if k.startswith(("layers.0.", "layers.1.")))
    assert stvit.MODEL_CONFIGS["stvit_base"]["init_values"] == 1e-6
    scaled = _tiny(init_values=1e-6)
    assert torch.all(scaled.layers[1].blocks[0].gamma_1 == 1e-6)
    assert torch.all(scaled.layers[3].blocks[0].gamma_2 == 1e-6)


def test_drop_path_schedule():
    model = _tiny(depths=[2, 1, 3, 2], drop_path_rate=0.3)
    rates = [blk.drop_path.drop_prob for layer in model.layers for blk in layer.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 8).tolist())


def test_drop_path():
    torch.manual_seed(seed_for("droppath"))
    dp = DropPath(0.5)
    x = torch.randn(64, 3, 2, 2) + 5
    assert dp.eval()(x) is x
    y = dp.train()(x)
    kept = (y != 0).flatten(1).all(1)
    dropped = (y == 0).flatten(1).all(1)
    assert (kept | dropped).all() and kept.any() and dropped.any()
    torch.testing.assert_close(y[kept], x[kept] * 2)


# ----------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------

def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("build,wrap", [(stvit.stvit_small, "model"), (stvit.stvit_small, "file"),
                                        (_tiny, "plain"), (_tiny, "state_dict-ddp")],
                         ids=["small-model", "small-file", "tiny-plain", "tiny-state_dict-ddp"])
def test_load_official_checkpoint_round_trip(build, wrap, tmp_path):
    torch.manual_seed(seed_for("roundtrip", wrap))
    src = build()
    _randomise(src, seed_for("roundtrip-params", wrap))
    sd = _official_state_dict(src)
    n_blocks = sum(len(layer.blocks) for layer in src.layers)
    assert len(sd) == len(src.state_dict()) + 2 * n_blocks
    if wrap == "plain":
        arg = sd
    elif wrap == "model":
        arg = {"model": sd, "epoch": 299}
    elif wrap == "state_dict-ddp":
        arg = {"state_dict": {"module." + k: v for k, v in sd.items()}}
    else:  # the official training script also saves its argparse.Namespace
        arg = tmp_path / "checkpoint.pth"
        torch.save({"model": sd, "args": argparse.Namespace(model="stvit_small", drop_path=0.1),
                    "epoch": 299}, arg)
        arg = str(arg)
    dst = build()
    res = stvit.load_official_checkpoint(dst, arg)
    assert res.missing_keys == [] and res.unexpected_keys == [] and res.mismatched_keys == []
    assert len(res.dropped_keys) == 2 * n_blocks
    assert all(k.endswith(CONSTANT_SUFFIXES) for k in res.dropped_keys)
    _assert_same_state(src, dst)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(x), src.eval()(x), rtol=0, atol=0)


def test_load_official_checkpoint_errors():
    torch.manual_seed(seed_for("errors"))
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    src = _tiny()
    _randomise(src, seed_for("errors-params"))
    sd = _official_state_dict(src)

    missing = dict(sd)
    del missing["layers.1.blocks.0.mlp2.fc1.weight"]
    with pytest.raises(RuntimeError, match=r"missing keys.*layers\.1\.blocks\.0\.mlp2\.fc1\.weight"):
        stvit.load_official_checkpoint(model, missing)

    unexpected = dict(sd, **{"layers.0.blocks.0.attn.relative_bias": torch.zeros(3)})
    with pytest.raises(RuntimeError, match=r"unexpected keys.*layers\.0\.blocks\.0\.attn\.relative_bias"):
        stvit.load_official_checkpoint(model, {"model": unexpected})

    wrong = dict(sd, **{"head.weight": torch.zeros(5, 48)})
    with pytest.raises(stvit.CheckpointMismatchError,
                       match=r"head\.weight \(checkpoint \[5, 48\] vs model \[10, 48\]\)"):
        stvit.load_official_checkpoint(model, wrong)

    # nothing was copied by the failed strict loads
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # strict=False loads what matches and reports the rest
    both = dict(missing, **{"extra.weight": torch.zeros(1), "head.weight": torch.zeros(5, 48)})
    res = stvit.load_official_checkpoint(model, both, strict=False)
    assert res.missing_keys == ["layers.1.blocks.0.mlp2.fc1.weight"]
    assert res.unexpected_keys == ["extra.weight"]
    assert [k for k, _, _ in res.mismatched_keys] == ["head.weight"]
    assert torch.equal(model.layers[0].blocks[0].norm2.weight, sd["layers.0.blocks.0.norm2.weight"])
    assert torch.equal(model.layers[1].blocks[0].mlp2.fc1.weight,
                       before["layers.1.blocks.0.mlp2.fc1.weight"])
    assert torch.equal(model.head.weight, before["head.weight"])


def test_load_official_checkpoint_rejects_non_state_dicts(tmp_path):
    with pytest.raises(TypeError, match="state dict"):
        stvit.load_official_checkpoint(_tiny(), [1, 2, 3])
    path = tmp_path / "bad.pth"
    torch.save({"model": _tiny().state_dict(), "fn": DropPath}, path)  # a class: not weights-only
    with pytest.raises(RuntimeError, match="weights_only"):
        stvit.load_official_checkpoint(_tiny(), str(path))


# ----------------------------------------------------------------------------------------------
# features_only
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("H,W", [pytest.param(224, 224, id="224x224"),
                                 pytest.param(100, 75, id="100x75-not-multiple")])
def test_features_only_shapes(H, W):
    torch.manual_seed(seed_for("features", H, W))
    model = stvit.stvit_small(features_only=True).eval()
    assert not any(k.startswith(("proj.", "norm.", "head.")) for k in model.state_dict())
    with torch.no_grad():
        feats = model(torch.randn(1, 3, H, W))
    assert len(feats) == 4
    h, w = H, W
    for i, f in enumerate(feats):
        stride = 4 * 2 ** i
        n_halvings = 2 if i == 0 else 1
        for _ in range(n_halvings):
            h, w = -(-h // 2), -(-w // 2)
        assert f.shape == (1, [64, 128, 320, 512][i], h, w)
        assert (h, w) == (-(-H // stride), -(-W // stride))
        assert model.feature_info[i]["reduction"] == stride
        assert model.feature_info[i]["num_chs"] == f.shape[1]


def test_features_only_loads_classification_checkpoint():
    torch.manual_seed(seed_for("features-load"))
    cls = _tiny()
    _randomise(cls, seed_for("features-load-params"))
    sd = _official_state_dict(cls)
    backbone = _tiny(features_only=True, out_indices=(1, 3))
    res = stvit.load_official_checkpoint(backbone, sd)
    heads = sorted(k for k in res.dropped_keys if not k.endswith(CONSTANT_SUFFIXES))
    assert heads and all(k.startswith(("proj.", "norm.", "head.")) for k in heads)
    x = torch.randn(2, 3, 70, 45)
    cls.eval(), backbone.eval()
    with torch.no_grad():
        feats = backbone(x)
        ref = cls.forward_feature_maps(x)
    assert [f.shape[1] for f in feats] == [24, 40]
    torch.testing.assert_close(feats[0], ref[1], rtol=0, atol=0)
    torch.testing.assert_close(feats[1], ref[3], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="features_only"):
        backbone.forward_features(x)


def test_pooled_features_and_headless_model():
    torch.manual_seed(seed_for("headless"))
    model = _tiny().eval()
    _randomise(model, seed_for("headless-params"))
    headless = _tiny(num_classes=0).eval()
    res = stvit.load_official_checkpoint(headless, _official_state_dict(model))
    assert sorted(k for k in res.dropped_keys if k.startswith("head.")) == ["head.bias", "head.weight"]
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        pooled = model.forward_features(x)
        assert pooled.shape == (2, 48)
        torch.testing.assert_close(headless(x), pooled, rtol=0, atol=0)
        torch.testing.assert_close(model(x), model.head(pooled), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def test_small_backward_end_to_end():
    torch.manual_seed(seed_for("backward"))
    model = stvit.stvit_small(drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    target = torch.randint(0, 1000, (2,))
    loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_gradient_checkpointing_matches():
    torch.manual_seed(seed_for("checkpointing"))
    ref = _tiny(drop_path_rate=0.).train()
    ckpt = _tiny(drop_path_rate=0., use_checkpoint=True).train()
    ckpt.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 48, 40)
    grads = []
    for m in (ref, ckpt):
        m.zero_grad()
        m(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)


def _gpu_backends():
    import stvit_kernels as sk

    return [pytest.param(b, marks=pytest.mark.cuda) for b in ("cuda", "triton")
            if b in sk.available_backends() and torch.cuda.is_available()]


@pytest.mark.parametrize("backend", _gpu_backends())
def test_model_on_gpu_matches_reference_backend(backend):
    """stvit_small on the GPU, training mode without dropout: logits, input and parameter gradients
    of a fused backend against the reference backend on the same device (same refine, same convs:
    the comparison sees the STA kernels)."""
    import copy

    import stvit_kernels as sk

    torch.manual_seed(seed_for("model-gpu", backend))
    model = stvit.stvit_small(num_classes=10, drop_path_rate=0.0).cuda().train()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 96, 128, device="cuda")
    results = []
    for m, be in ((model, backend), (ref, "reference")):
        xi = x.clone().requires_grad_()
        with sk.use_backend(be):
            out = m(xi)
        grads = torch.autograd.grad(out.square().mean(), [xi, *m.parameters()])
        results.append((out, grads))
    (out, grads), (out_r, grads_r) = results
    torch.testing.assert_close(out, out_r, rtol=1e-4, atol=1e-4)
    for (name, _), g, g_r in zip(model.named_parameters(), grads[1:], grads_r[1:]):
        torch.testing.assert_close(g, g_r, rtol=1e-3, atol=1e-4, msg=name)
    torch.testing.assert_close(grads[0], grads_r[0], rtol=1e-3, atol=1e-4)
