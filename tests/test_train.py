"""The training recipe (`stvit.train`): DDP under torchrun (gloo on the CPU), gradient equivalence
with one process, bit-for-bit resume, cpu vs reference backend, the data readers and every bad input
the command names. All on the CPU (also where a GPU is present) and on a reduced STViT (one block
per stage, 16-40 channels) at 64x64 pixels, so that the whole file runs in about a minute on 2 cores.

Run as a script under torchrun, this file is the worker of the DDP tests (see ``_worker``)."""
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import stvit
import stvit_kernels as sk
from stvit import train
from stvit.data import ImageFolder, SyntheticImages, check_img_size

#: A 4-stage STViT with one block per stage (77k parameters; STA at 2x2 super tokens in stage 1).
TINY = {"embed_dim": [16, 24, 32, 40], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4],
        "projection": 48}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(out, *extra, epochs=3, size=32, batch=4):
    """Arguments of a tiny synthetic run; ``extra`` come last (a repeated flag overrides)."""
    return ["--synthetic", "--synthetic-size", str(size), "--img-size", "64", "--epochs", str(epochs),
            "--batch-size", str(batch), "--warmup-epochs", "1", "--lr", "2e-3", "--log-every", "1",
            "--no-progress", "--workers", "0", "--device", "cpu", "--out", str(out),
            "--model-kwargs", json.dumps(TINY), *extra]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads mostly wait for each other (the
    kernels are bitwise deterministic at any thread count, so nothing else changes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _steps(out):
    with open(os.path.join(out, "steps.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _torchrun(*argv, timeout=240):
    """``torchrun --standalone --nproc_per_node 2 ...`` on gloo; returns the finished process."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _needs_cpu_backend():
    if "cpu" not in sk.available_backends():
        if os.environ.get("STVIT_EXPECT_COMPILED") == "1":
            pytest.fail(f"the compiled cpu backend is missing: {sk.explain(torch.zeros(1, 1, 1, 1), 'cpu')}")
        pytest.skip("the compiled cpu backend is not built")


# ----------------------------------------------------------------------------------------------
# DDP
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One ``torchrun --nproc_per_node 2`` (gloo) of this file's worker: a DDP gradient step, then a
    3-epoch training through ``stvit.train.cli`` (what ``python -m stvit.train`` runs). One launch
    for both tests: starting two Python processes with torch is most of the time here."""
    _needs_cpu_backend()
    out = tmp_path_factory.mktemp("ddp")
    proc = _torchrun(os.path.abspath(__file__), "worker", str(out))
    return out, proc


def _worker(out_dir):
    """The torchrun worker of :func:`ddp_run`.

    Gradient step: one step of DDP on this rank's shard (what stvit.train does), the gradients
    saved per rank. The model is in eval mode: BatchNorm then uses its running statistics, the same
    for a shard and for the whole batch. In training mode each process normalises with its own
    shard's statistics (as in the official recipe; --sync-bn on GPUs makes them global), so one
    process on the global batch would compute another function and the comparison would test
    BatchNorm, not DDP."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    env = train.setup_distributed("cpu", "gloo")
    args = train.parse_args(_args(out_dir, size=16))
    train_set, _, n_cls = train.make_datasets(args)
    loader = train.make_loader(train_set, env, 4, True, seed=3, workers=0)
    loader.sampler.set_epoch(1)
    indices = list(loader.sampler)[:4]
    x, y = next(iter(loader))
    torch.manual_seed(0)
    model = train.build_model("stvit_small", n_cls, TINY, drop_path_rate=0.0, backend="cpu").eval()
    ddp = DDP(model)
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)(ddp(x), y)
    loss.backward()
    torch.save({"indices": indices, "grads": {n: p.grad for n, p in model.named_parameters()}},
               os.path.join(out_dir, f"rank{env.rank}.pt"))
    del ddp

    # training: the process group exists already; main() uses it and destroys it at the end
    code = train.cli(_args(os.path.join(out_dir, "run"), size=64, epochs=3, batch=4))
    # Leave without the interpreter's teardown: once in a CI run under load (torch 2.11, gloo),
    # rank 1 aborted there ("terminate called without an active exception", SIGABRT) after the
    # training, its log and checkpoints had all finished; what the tests check is written by then.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def test_torchrun_two_processes_train_and_loss_goes_down(ddp_run):
    """2 gloo processes: the loss goes down, rank 0 alone prints, logs and checkpoints, and the
    shards of one global batch add up to the steps of an epoch."""
    tmp, proc = ddp_run
    out = tmp / "run"
    assert proc.stdout.count("epoch 1/3:") == 1          # rank 0 prints, rank 1 does not
    log = json.load(open(out / "log.json"))
    assert log["world_size"] == 2 and [e["epoch"] for e in log["epochs"]] == [1, 2, 3]
    steps = _steps(out)
    assert len(steps) == 3 * 64 // (2 * 4)                # 64 images, 2 processes x 4 per step
    first, last = log["epochs"][0]["train_loss"], log["epochs"][-1]["train_loss"]
    assert last < first - 0.1, (first, last)
    losses = [s["loss"] for s in steps]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1, losses
    assert sorted(os.listdir(out)) == ["best.pt", "last.pt", "log.json", "steps.jsonl"]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["epoch"] == 3
    # every rank's RNG stream is its own (drop-path masks differ between ranks)
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])


def test_ddp_gradients_match_one_process_on_the_global_batch(ddp_run):
    tmp, _ = ddp_run
    r0, r1 = (torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    indices = r0["indices"] + r1["indices"]
    assert len(set(indices)) == 8                         # the two shards are disjoint

    data = SyntheticImages(16, 10, 64, seed=0, split=0)   # what make_datasets built in the workers
    x = torch.stack([data[i][0] for i in indices])
    y = torch.tensor([data[i][1] for i in indices])

    def grads(xb, yb):
        torch.manual_seed(0)
        model = train.build_model("stvit_small", 10, TINY, drop_path_rate=0.0, backend="cpu").eval()
        nn.CrossEntropyLoss(label_smoothing=0.1)(model(xb), yb).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    full = grads(x, y)
    half = grads(x[:4], y[:4])
    assert full.keys() == r0["grads"].keys()
    differ = 0
    for name, g in full.items():
        assert torch.equal(r0["grads"][name], r1["grads"][name]), name   # all-reduced: identical
        torch.testing.assert_close(r0["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
        differ += not torch.allclose(half[name], g, rtol=1e-2, atol=1e-4)
    # one shard alone gives other gradients: the match above is the all-reduce's doing
    assert differ > len(full) // 2


# ----------------------------------------------------------------------------------------------
# One process: resume, backends, schedule
# ----------------------------------------------------------------------------------------------

def test_resume_reproduces_the_next_steps_bit_for_bit(tmp_path):
    """An uninterrupted 3-epoch run against one killed during epoch 3 and resumed (``--resume
    auto``) from its epoch-2 checkpoint: every later loss, the weights and the optimiser state are
    equal to the bit. Drop path and label smoothing make the steps depend on the RNG state; the
    control resumes without the saved RNG states and must diverge."""
    _needs_cpu_backend()
    common = ("--drop-path", "0.2", "--backend", "cpu", "--save-every", "1")
    full = tmp_path / "full"
    train.main(_args(full, *common, epochs=3, size=16))
    a = _steps(full)
    assert len(a) == 3 * 16 // 4 and {s["epoch"] for s in a} == {1, 2, 3}

    part = tmp_path / "part"
    os.makedirs(part)
    shutil.copy(full / "epoch_2.pt", part / "last.pt")
    with open(part / "steps.jsonl", "w") as f:              # killed after 2 steps of epoch 3
        f.writelines(json.dumps(s) + "\n" for s in a[:10])
    res = train.main(_args(part, *common, "--resume", "auto", epochs=3, size=16))
    assert [e["epoch"] for e in res["epochs"]] == [1, 2, 3]
    assert _steps(part) == a                                # every loss and lr, exactly
    ca = torch.load(full / "last.pt", weights_only=True)
    cb = torch.load(part / "last.pt", weights_only=True)
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    for i, sa in ca["optimizer"]["state"].items():
        for k, v in sa.items():
            assert torch.equal(v, cb["optimizer"]["state"][i][k]), (i, k)
    assert ca["scheduler"] == cb["scheduler"]
    untimed = [[{k: v for k, v in e.items() if k not in ("time_s", "images_per_s")} for e in c["history"]]
               for c in (ca, cb)]
    assert untimed[0] == untimed[1]                       # train/val loss and top-1 of every epoch

    control = tmp_path / "control"
    ckpt = torch.load(full / "epoch_2.pt", weights_only=True)
    ckpt["rng"] = []
    os.makedirs(control)
    torch.save(ckpt, control / "last.pt")
    with pytest.warns(UserWarning, match="not a bit-for-bit continuation"):
        train.main(_args(control, *common, "--resume", "auto", epochs=3, size=16))
    c = _steps(control)
    assert [s["lr"] for s in c] == [s["lr"] for s in a[8:]]
    assert [s["loss"] for s in c] != [s["loss"] for s in a[8:]]


def test_cpu_and_reference_backends_train_to_the_same_curve(tmp_path):
    _needs_cpu_backend()
    runs = {}
    for backend in ("cpu", "reference"):
        train.main(_args(tmp_path / backend, "--backend", backend, "--drop-path", "0.1", epochs=2, size=16))
        runs[backend] = [s["loss"] for s in _steps(tmp_path / backend)]
    cpu, ref = torch.tensor(runs["cpu"]), torch.tensor(runs["reference"])
    assert len(cpu) == 8
    torch.testing.assert_close(cpu, ref, rtol=1e-4, atol=1e-5)
    # the kernels round differently: equal bits would mean --backend was not honoured
    assert not torch.equal(cpu, ref)


def test_warmup_cosine_schedule():
    lr = [train.warmup_cosine(s, 100, 10, 1e-3, 1e-5, 1e-6) for s in range(101)]
    assert lr[0] == 1e-6 and abs(lr[10] - 1e-3) < 1e-12 and abs(lr[100] - 1e-5) < 1e-12
    assert all(a < b for a, b in zip(lr[:10], lr[1:11]))          # warm-up rises
    assert all(a > b for a, b in zip(lr[10:100], lr[11:101]))     # cosine falls
    assert abs(lr[55] - (1e-5 + 0.5 * (1e-3 - 1e-5))) < 1e-12     # half-way down at mid-decay


def test_no_weight_decay_on_norms_and_biases():
    model = train.build_model("stvit_small", 10, TINY)
    decay, no_decay = train.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim > 1 for p in decay["params"])
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert {"head.bias", "norm.weight", "layers.0.blocks.0.norm1.norm.weight"} <= undecayed
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.05


def test_bf16_autocast_trains(tmp_path):
    """The GPU default (bf16 autocast), here on the CPU: the STA ops run under autocast too."""
    res = train.main(_args(tmp_path, "--precision", "bf16", epochs=1, size=8))
    rec = res["epochs"][0]
    assert rec["train_loss"] == rec["train_loss"] and 1.0 < rec["train_loss"] < 4.0
    assert json.load(open(tmp_path / "log.json"))["args"]["precision"] == "bf16"


def test_progress_bar():
    class Stream(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    tty, log = Stream(True), Stream(False)
    for stream in (tty, log):
        bar = train.Progress(40, "epoch 1/2", True, stream=stream)
        for i in range(1, 41):
            bar.update(i, f"loss {1 / i:.3f}" if i % 8 == 0 else None)
        bar.close()
    assert tty.getvalue().count("\r") >= 1 and "40/40" in tty.getvalue() and "loss 0.025" in tty.getvalue()
    lines = log.getvalue().splitlines()                   # not a terminal: a line every 10%
    assert len(lines) == 10 and lines[-1].startswith("epoch 1/2 [########################] 40/40")
    assert lines[-1].endswith("loss 0.025") and "\r" not in log.getvalue()
    off = Stream(True)
    train.Progress(5, "x", False, stream=off).update(5)
    assert off.getvalue() == ""


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def _image_folder(root, classes=("cat", "dog"), per_class=4, size=(40, 52)):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(classes):
        os.makedirs(root / name / "sub", exist_ok=True)
        for i in range(per_class):
            px = (torch.rand(size[1], size[0], 3, generator=g) * 80 + 120 * c).byte().numpy()
            folder = root / name / ("sub" if i % 2 else "")
            Image.fromarray(px).save(folder / f"{i}.png")


def test_image_folder_training_runs_and_augments_reproducibly(tmp_path):
    _image_folder(tmp_path / "data" / "train")
    _image_folder(tmp_path / "data" / "val", per_class=2)
    ds = ImageFolder(str(tmp_path / "data" / "train"), 32, train=True, seed=5)
    assert ds.classes == ["cat", "dog"] and len(ds) == 8        # images in sub-folders count too
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    assert torch.equal(ds[3][0], x)                              # same epoch, same crop
    ds.set_epoch(1)
    assert not torch.equal(ds[3][0], x)                          # next epoch, another crop
    val = ImageFolder(str(tmp_path / "data" / "val"), 32, train=False, classes=ds.classes)
    assert torch.equal(val[0][0], val[0][0]) and len(val) == 4

    res = train.main(["--data", str(tmp_path / "data"), "--img-size", "32", "--epochs", "1",
                      "--batch-size", "4", "--workers", "0", "--no-progress", "--device", "cpu", "--out",
                      str(tmp_path / "run"), "--model-kwargs", json.dumps(TINY)])
    rec = res["epochs"][0]
    assert rec["epoch"] == 1 and 0 <= rec["val_top1"] <= 100 and rec["val_loss"] > 0


# ----------------------------------------------------------------------------------------------
# Bad input: one clear error each
# ----------------------------------------------------------------------------------------------

def test_missing_data_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data folder .*nowhere.* does not exist"):
        train.main(["--data", str(tmp_path / "nowhere"), "--img-size", "32"])
    os.makedirs(tmp_path / "data" / "train")
    with pytest.raises(FileNotFoundError, match=r"no 'val' sub-folder"):
        train.main(["--data", str(tmp_path / "data"), "--img-size", "32"])
    os.makedirs(tmp_path / "data" / "val")
    with pytest.raises(ValueError, match=r"has no class folders"):
        train.main(["--data", str(tmp_path / "data"), "--img-size", "32"])


def test_empty_class_folder(tmp_path):
    _image_folder(tmp_path / "data" / "train")
    _image_folder(tmp_path / "data" / "val")
    os.makedirs(tmp_path / "data" / "train" / "emu" / "nested")
    (tmp_path / "data" / "train" / "emu" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"class folder .*emu.* has no images"):
        train.main(["--data", str(tmp_path / "data"), "--img-size", "32"])


def test_validation_classes_must_match(tmp_path):
    _image_folder(tmp_path / "data" / "train")
    _image_folder(tmp_path / "data" / "val", classes=("cat", "eel"))
    with pytest.raises(ValueError, match=r"missing \['dog'\], extra \['eel'\]"):
        train.main(["--data", str(tmp_path / "data"), "--img-size", "32"])


@pytest.mark.parametrize("size", [100, 48, 0, -32])
def test_image_size_that_does_not_divide(tmp_path, size):
    with pytest.raises(ValueError, match=rf"image size {size} does not divide by 32"):
        train.main(_args(tmp_path, "--img-size", str(size)))
    with pytest.raises(ValueError, match="does not divide by 32"):
        check_img_size(size)


def test_cli_prints_the_error_and_exits_2(tmp_path, capsys):
    assert train.cli(_args(tmp_path, "--img-size", "100")) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m stvit.train: error: image size 100 does not divide by 32")


def test_checkpoint_of_another_model(tmp_path):
    train.main(_args(tmp_path / "tiny", epochs=1, size=8))
    ckpt = str(tmp_path / "tiny" / "last.pt")
    other = dict(TINY, embed_dim=[16, 24, 32, 48])
    with pytest.raises(stvit.CheckpointMismatchError, match=r"of another model: it holds stvit_small"):
        train.main(_args(tmp_path / "b", "--resume", ckpt, "--model-kwargs", json.dumps(other),
                         epochs=2, size=8))
    with pytest.raises(stvit.CheckpointMismatchError, match=r"of another model: it holds stvit_small"):
        train.main(_args(tmp_path / "b", "--resume", ckpt, "--model", "stvit_base", epochs=2, size=8))
    with pytest.raises(stvit.CheckpointMismatchError, match=r"another model .*shape mismatches: layers"):
        train.main(_args(tmp_path / "c", "--pretrained", ckpt, "--model-kwargs", json.dumps(other), size=8))
    torch.save(stvit.stvit_small(**TINY).state_dict(), tmp_path / "weights.pt")
    with pytest.raises(stvit.CheckpointMismatchError, match=r"not a stvit.train checkpoint.*--pretrained"):
        train.main(_args(tmp_path / "d", "--resume", str(tmp_path / "weights.pt"), size=8))
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*missing.pt.* does not exist"):
        train.main(_args(tmp_path / "d", "--resume", str(tmp_path / "missing.pt"), size=8))


def test_pretrained_weights_load_with_another_head(tmp_path):
    train.main(_args(tmp_path / "a", epochs=1, size=8))
    # the same architecture with 5 classes: everything but the head comes from the checkpoint
    res = train.main(_args(tmp_path / "b", "--pretrained", str(tmp_path / "a" / "last.pt"),
                           "--num-classes", "5", "--eval-only", size=8))
    assert set(res["epochs"][0]) >= {"val_loss", "val_top1"}


def test_unknown_backend_and_bad_flags(tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        train.main(_args(tmp_path, "--backend", "fast"))
    with pytest.raises(SystemExit):
        train.parse_args(_args(tmp_path, "--model", "stvit_huge"))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train.main(_args(tmp_path, "--batch-size", "64", size=8))


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        _worker(sys.argv[2])
    else:
        sys.exit(f"usage: torchrun --nproc_per_node 2 {sys.argv[0]} worker OUT_DIR")
