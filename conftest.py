"""Helpers shared by test_blockwise.py and test_run.py: tiny real image folders, a tiny trained run, runs and
their files, and the stop-and-resume reference run."""
import contextlib
import dataclasses
import copy
import fnmatch
import functools
import inspect
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageFilter
import losses
import pipeline
import probe
import recompute
import routing
import train
import vit
from blockwise import POOLINGS, BlockResNet, Pool, add_noise, parse_blocks
import augment as aug
import bookkeeping
import cli
import distributed
import evaluation
from augment import View, apply_pil, augment, decode, draw, normalize, pack, to_tensor
from data import Seeded, balanced_subset, load_image, plain_transform, probe_transforms
from data import dataset as load_dataset
from train import LARS
from vit import BlockViT

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(arch="resnet18", head_dim=128, projector_widths=(64, 64))
BT4 = [lambda z1, z2, y: losses.barlow_twins(z1, z2)] * 4  # the default loss of each of 4 blocks


# ---------------- helpers: tiny real image folders, runs and their files

def image_folder(root, per_class=8, classes=2, size=40, splits=("train", "val")):
    """A tiny ImageNet-layout folder of real PNG files: class c has a bright channel c."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"class{c}"), exist_ok=True)
            for i in range(per_class):
                a = (rng.random((size, size, 3)) * 128).astype(np.uint8)
                a[..., c % 3] += 127
                Image.fromarray(a).save(os.path.join(root, split, f"class{c}", f"{i}.png"))
    return str(root)


VIT_MASKED = ["--arch", "vit_tiny", "--patch-size", "8", "--mask", "0,0.25,0.5,0.75"]
SMALL = ["--arch", "resnet18", "--image-size", "32", "--projector", "64-64", "--head-dim", "128",
         "--workers", "0", "--print-freq", "1", "--warmup-epochs", "0", "--lr", "0.05", "--no-compile",
         "--device", "cpu"]


def run_train(data, out, *extra):
    args = train.get_args(["--data", data, "--out", str(out), *SMALL, *extra])
    train.main(args)
    return args


def step_log(out, key="loss"):
    """The entries of a run's log.jsonl that have `key`: "loss" for the training steps, "monitor" for the monitors."""
    return [e for e in map(json.loads, open(os.path.join(out, "log.jsonl"))) if key in e]


def weights(out):
    return torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)


def train_tiny(tmp_path):
    data = image_folder(tmp_path / "data")
    run_train(data, tmp_path / "run", "--epochs", "1", "--batch-size", "8")
    return data, str(tmp_path / "run" / "checkpoint.pth")


def torchrun(*args, nproc=2, timeout=600, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=timeout, **kw)


def expect_one_line_error(capsys, argv, fragment, entry=train):
    with pytest.raises(SystemExit) as e:
        cli.run(entry.main, entry.get_args(argv), "x") if isinstance(argv, list) else argv()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err and fragment in err, err
    return err


def probe_argv(ckpt, data, *extra):
    return [ckpt, "--data", data, "--image-size", "32", "--workers", "0", "--batch-size", "8", "--epochs", "2",
            "--device", "cpu", *extra]


def probe_args(ckpt, data, *extra):
    return probe.get_args(probe_argv(ckpt, data, *extra))



def float64_run(data, out, *extra, nproc=1):
    """A 2-epoch run in float64 (BLOCKWISE_FLOAT64, for tests only), in `nproc` processes."""
    argv = ["train.py", "--data", data, "--out", str(out), *SMALL, "--epochs", "2", "--batch-size", "8",
            "--monitor-every", "0", *extra]
    env = {**os.environ, "BLOCKWISE_FLOAT64": "1", "OMP_NUM_THREADS": "1"}
    r = torchrun(*argv, nproc=nproc, env=env) if nproc > 1 else \
        subprocess.run([sys.executable, *argv], cwd=HERE, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def assert_same_float64_run(a, b):
    """The same per-block losses at every step and the same final weights and LARS momentum, to rounding."""
    la, lb = ([(e["epoch"], e["step"], e["loss"]) for e in step_log(out)] for out in (a, b))
    assert [s[:2] for s in la] == [s[:2] for s in lb] and la  # --print-freq 1: every step, once
    assert np.allclose([s[2] for s in la], [s[2] for s in lb], rtol=1e-10, atol=0)
    wa, wb = weights(a), weights(b)
    assert wa["model"].keys() == wb["model"].keys() and wa["epoch"] == wb["epoch"]
    for k in wa["model"]:
        assert torch.allclose(wa["model"][k].double(), wb["model"][k].double(), rtol=1e-10, atol=1e-12), k
    sa, sb = wa["optimizer"]["state"], wb["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.allclose(sa[i]["mu"], sb[i]["mu"], rtol=1e-10, atol=1e-12)
                                          for i in sa)


def wait_for_step(p, out):
    """Until the run `p` has logged its first training step (or ended)."""
    while p.poll() is None and not (os.path.exists(os.path.join(out, "log.jsonl")) and step_log(out)):
        time.sleep(0.01)


def stop_run(cmd, out, sig, moment="step", group=False, env=None):
    """The stop-and-resume tests' first half: start `cmd --out out`; wait for `moment` ("step": its first logged
    step; else a file name pattern in `out`, e.g. "checkpoint.pth", watched without sleeping: a checkpoint's
    temporary file lives for milliseconds); send `sig` (to the whole process group with `group`; a function is
    called with the process instead). A SIGKILL must kill it; any other stop must save and exit 0. Returns the
    run's stdout."""
    p = subprocess.Popen(cmd + ["--out", str(out)], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=group, env=env)
    if moment == "step":
        wait_for_step(p, out)
    while moment != "step" and p.poll() is None and not (os.path.isdir(out) and fnmatch.filter(os.listdir(out),
                                                                                                  moment)):
        pass
    if callable(sig):
        sig(p)
    else:
        os.killpg(p.pid, sig) if group else p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=300)
    if sig == signal.SIGKILL:
        assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    else:
        assert p.returncode == 0 and "saved" in stdout, stderr[-3000:]
    return stdout


def resume_run(cmd, out):
    """The second half: rerun the same command to its end."""
    subprocess.run(cmd + ["--out", str(out)], cwd=HERE, check=True, capture_output=True)


# ---------------- fixtures: a tiny trained run, the reference run of the resume tests

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real tiny checkpoint from train.py, shared by the probe tests."""
    root = tmp_path_factory.mktemp("probe")
    data = image_folder(root / "data")
    run_train(data, root / "run", "--epochs", "1", "--batch-size", "8")
    return data, str(root / "run" / "checkpoint.pth")


def write_cifar10(root, n=20):
    """Files in CIFAR-10's python format, written here (no internet): 5 training batches, a test batch, the meta."""
    import pickle
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": [int(v) for v in rng.integers(0, 10, n)]}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return str(root)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-epoch run (4 steps an epoch) that interrupted runs must reproduce bit for bit."""
    root = tmp_path_factory.mktemp("resume")
    data = image_folder(root / "data", per_class=16)
    cmd = [sys.executable, "train.py", "--data", data, *SMALL, "--epochs", "2", "--batch-size", "8"]
    subprocess.run(cmd + ["--out", str(root / "ref")], cwd=HERE, check=True, capture_output=True)
    return cmd, weights(root / "ref")
