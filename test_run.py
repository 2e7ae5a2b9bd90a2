"""Tests of what a run survives: datasets on real image files, resume and the run's files, probe.py's command
line, and failure handling (every failure one line, nothing lost). Shared helpers: conftest.py."""
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
import bench
import bookkeeping
import cli
import distributed
import evaluation
from augment import View, apply_pil, augment, decode, draw, normalize, pack, to_tensor
from data import Seeded, balanced_subset, load_image, plain_transform, probe_transforms
from data import dataset as load_dataset
from train import LARS
from vit import BlockViT
from conftest import *  # noqa: F401,F403 (the shared helpers and constants)


# ---------------- the datasets (data.py), on real image files


def test_augmentations_depend_on_seed_epoch_and_index_only():
    ds = [(Image.fromarray(np.full((40, 40, 3), 100, np.uint8)), 0)] * 2
    seeded = Seeded(ds, aug.TwoViews(32), seed=0)
    a = seeded[0][0][0]
    assert torch.equal(a, seeded[0][0][0])  # drawn again: the same (resume, any number of workers)
    assert not torch.equal(a, seeded[1][0][0])  # another image index
    seeded.epoch = 1
    assert not torch.equal(a, seeded[0][0][0])  # another epoch
    assert not torch.equal(a, Seeded(ds, aug.TwoViews(32), seed=1)[0][0][0])  # another seed


def test_limit_keeps_every_class_balanced_and_seeded():
    targets = [0] * 50 + [1] * 30 + [2] * 5 + [3] * 40
    sub = balanced_subset(targets, 40, seed=0)
    counts = np.bincount([targets[i] for i in sub])
    assert len(sub) == len(set(sub)) == 40 and sorted(sub) == sub
    assert counts.tolist() == [12, 12, 5, 11]  # round robin over the classes; class 2 has only 5
    assert sub == balanced_subset(targets, 40, seed=0) != balanced_subset(targets, 40, seed=1)


def test_limit_on_an_image_folder_takes_every_class(tmp_path):
    data = image_folder(tmp_path / "data", per_class=6, classes=4)
    ds = load_dataset("folder", data, limit=8, seed=3)
    assert np.bincount([ds.dataset.targets[i] for i in ds.indices]).tolist() == [2, 2, 2, 2]


def test_hidden_folders_and_files_are_not_data(tmp_path):
    """A notebook's .ipynb_checkpoints/ in train/ is no class (it would shift every label by one), and macOS's
    ._x.png files are not images (they would stop the run)."""
    data = image_folder(tmp_path / "data", per_class=3)
    image_folder(tmp_path / "data" / "train" / ".ipynb_checkpoints", per_class=2, classes=1, splits=(".",))
    (tmp_path / "data" / "train" / "class0" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    ds = load_dataset("folder", data)
    assert ds.classes == ["class0", "class1"] and len(ds) == 6
    assert load_dataset("folder", data, train=False).classes == ["class0", "class1"]


def test_val_is_labelled_with_train_classes_by_name(tmp_path, capsys):
    """val/ without class1: its class2 keeps train/'s label 2, and the missing class is said; a val/ class that
    train/ lacks is refused in one line."""
    data = image_folder(tmp_path / "data", per_class=2, classes=3, splits=("train",))
    image_folder(tmp_path / "v", per_class=2, classes=3, splits=("val",))
    shutil.rmtree(tmp_path / "v" / "val" / "class1")
    shutil.move(str(tmp_path / "v" / "val"), os.path.join(data, "val"))
    val = load_dataset("folder", data, train=False)
    assert sorted(set(val.targets)) == [0, 2] and val.classes == ["class0", "class1", "class2"]
    assert "val/ lacks 1 of train/'s 3 classes (class1)" in capsys.readouterr().out
    os.makedirs(os.path.join(data, "val", "class1b"))
    Image.new("RGB", (8, 8)).save(os.path.join(data, "val", "class1b", "x.png"))
    with pytest.raises(ValueError, match="class1b is not a class of train/"):
        load_dataset("folder", data, train=False)


def test_images_that_would_be_read_wrongly_are_scaled_or_refused(tmp_path):
    grey16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 16-bit, up to 63000
    Image.fromarray(grey16).save(tmp_path / "a.png")
    got = np.asarray(load_image(tmp_path / "a.png").convert("L"))
    assert got.max() == 63000 >> 8 and got[0, 1] == 1000 >> 8  # scaled, not saturated to white
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "b.tiff")
    with pytest.raises(ValueError, match="floating-point"):
        load_image(tmp_path / "b.tiff")
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(tmp_path / "bomb.png")
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, 1000  # 90,000 pixels is a bomb to this limit
    try:
        with pytest.raises(ValueError, match="bomb.png"):
            load_image(tmp_path / "bomb.png")
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_a_symlink_loop_counts_each_image_once(tmp_path):
    data = image_folder(tmp_path / "data", per_class=3)
    os.symlink(os.path.join(data, "train", "class0"), os.path.join(data, "train", "class0", "loop"))
    assert len(load_dataset("folder", data)) == 6




# ---------------- resume and the run's files (bookkeeping.py)




def assert_same_run(a, b):
    assert b["epoch"] == 2 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    momenta = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(momenta[0][i]["mu"], momenta[1][i]["mu"]) for i in momenta[0])


@pytest.mark.parametrize("moment", ["mid-epoch", "during-checkpoint-write"])
def test_killed_run_resumes_exactly(reference, tmp_path, moment):
    """SIGKILL (no save): the rerun resumes from the last whole checkpoint (after the first epoch, or none:
    a write cut off leaves no checkpoint.pth) and ends as the uninterrupted run. test_gpu_aug_run_resumes_exactly
    kills right after the first checkpoint."""
    cmd, ref = reference
    out = tmp_path / "out"
    stop_run(cmd, out, signal.SIGKILL, {"mid-epoch": "step", "during-checkpoint-write": "checkpoint.pth.*.tmp"}[moment])
    resume_run(cmd, out)
    assert_same_run(ref, weights(out))
    missing, unexpected = torchvision.models.resnet18().load_state_dict(
        torch.load(out / "trunk.pth", weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []


def test_a_pipelined_run_stopped_mid_epoch_resumes_in_one_process(tmp_path):
    """A 2-stage run (--stages 1,234) whose stage 1 gets SIGTERM mid-epoch lets its batches in flight finish,
    saves the one-process checkpoint and exits 0; rerun in one process without --stages, it ends as the run that
    was never stopped (float64, rtol 1e-10)."""
    data = image_folder(tmp_path / "data", per_class=16)  # 4 steps an epoch
    float64_run(data, tmp_path / "ref")
    out = str(tmp_path / "pipe")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--data", data, *SMALL, "--epochs", "2", "--batch-size", "8", "--monitor-every", "0", "--stages", "1,234"]
    stdout = stop_run(cmd, out, lambda p: os.kill(rank_pid(out, 1), signal.SIGTERM),
                      env={**os.environ, "BLOCKWISE_FLOAT64": "1", "OMP_NUM_THREADS": "1"})
    assert "another process was signalled: saved" in stdout
    stopped = weights(out)
    assert (stopped["epoch"], stopped["step"]) != (2, 0)
    float64_run(data, out)  # one process resumes it
    assert_same_float64_run(tmp_path / "ref", out)


def test_signal_to_the_process_group_saves_mid_epoch_and_resumes_exactly(reference, tmp_path):
    """One Ctrl-C (SIGINT to the whole process group, as scancel's SIGTERM), with 2 data-loading workers that get
    the signal too: the step finishes, the run saves and exits 0, and resumes exactly (the reference had no
    workers: resume is exact whatever the workers)."""
    cmd, ref = reference
    cmd = cmd + ["--workers", "2"]
    out = tmp_path / "out"
    assert "SIGINT: saved" in stop_run(cmd, out, signal.SIGINT, group=True)
    assert weights(out)["step"] > 0  # saved in the middle of an epoch
    resume_run(cmd, out)
    assert_same_run(ref, weights(out))


def test_slurm_warning_and_hangup_save_like_sigterm(reference, tmp_path, monkeypatch):
    """SIGUSR1 (Slurm's warning) stops a real run, which saves and resumes exactly; SIGTERM, SIGHUP and a first
    SIGINT sent to this process reach the same handler (a SIGINT after them quits at once)."""
    cmd, ref = reference
    out = tmp_path / "out"
    assert "SIGUSR1: saved" in stop_run(cmd, out, signal.SIGUSR1)
    resume_run(cmd, out)
    assert_same_run(ref, weights(out))
    monkeypatch.setattr(cli, "STOP", [])
    kept = {s: signal.getsignal(s) for s in cli.STOP_SIGNALS}
    try:
        cli.stop_on_signals()
        for sig in signal.SIGINT, signal.SIGTERM, signal.SIGHUP:
            os.kill(os.getpid(), sig)
        assert cli.STOP == [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for s, h in kept.items():
            signal.signal(s, h)


@pytest.mark.parametrize("extra", [["--route", "below", "--arch", "vit_tiny", "--patch-size", "8", "--mask",
                                    "0,0.25,0.5,0.75"], ["--mode", "sequential", "--blocks", "12,3", "--epochs", "1",
                                                         "--augmentations", "jitter-crop,full"]],
                         ids=["routed-masked-vit", "adaptive"])
def test_routed_adaptive_and_masked_runs_resume_exactly(tmp_path, extra):
    """Routing's difficulty table (kept in the checkpoint) in a ViT with token masks (drawn from the step's seed),
    and the switch from one block's views to the next (App. A): a run stopped by SIGTERM after its first
    checkpoint resumes bit for bit."""
    data = image_folder(tmp_path / "data", per_class=16)
    cmd = [sys.executable, "train.py", "--data", data, *SMALL, "--epochs", "2", "--batch-size", "8", *extra]
    resume_run(cmd, tmp_path / "full")  # the uninterrupted run
    out = tmp_path / "out"
    assert "SIGTERM: saved" in stop_run(cmd, out, signal.SIGTERM, "checkpoint.pth")
    resume_run(cmd, out)
    a, b = weights(tmp_path / "full"), weights(out)
    assert_same_run(a, b)
    assert "router" not in a or torch.equal(a["router"], b["router"])


def test_gpu_aug_run_resumes_exactly(reference, tmp_path):
    """--gpu-aug (on CPU here, the same code): killed after its first epoch, the run resumes bit for bit."""
    cmd, _ = reference
    cmd = cmd + ["--gpu-aug"]
    resume_run(cmd, tmp_path / "full")  # the uninterrupted run
    out = tmp_path / "out"
    stop_run(cmd, out, signal.SIGKILL, "checkpoint.pth")
    resume_run(cmd, out)
    assert_same_run(weights(tmp_path / "full"), weights(out))


def test_a_rerun_may_extend_but_not_change_the_run(tmp_path, capsys):
    data, _ = train_tiny(tmp_path)
    base = [*SMALL, "--data", data, "--out", str(tmp_path / "run"), "--batch-size", "8"]
    for extra, says in ((["--epochs", "2", "--lr", "0.1"], "was run with --lr 0.05, not 0.1"),
                        (["--epochs", "2", "--seed", "1"], "--seed 0, not 1"),
                        (["--epochs", "2", "--loss", "vicreg"], "--loss barlowtwins, not vicreg"),
                        (["--epochs", "2", "--batch-size", "4"], "--batch-size 8, not 4"),
                        (["--epochs", "2", "--limit", "8"], "--limit 0, not 8")):
        expect_one_line_error(capsys, base + extra, says)
    assert weights(tmp_path / "run")["epoch"] == 1
    train.main(train.get_args(base + ["--epochs", "2", "--workers", "1", "--print-freq", "3"]))  # extend: allowed
    assert weights(tmp_path / "run")["epoch"] == 2
    assert [e for e in map(json.loads, open(tmp_path / "run" / "log.jsonl")) if "resume" in e] == \
        [dict(resume=dict(epoch=1, step=0))]


def test_every_flag_that_changes_the_run_is_refused_on_resume(tmp_path):
    """Each flag outside the resumable list, changed on a rerun, is refused naming it (a loop over all of them)."""
    _, ckpt = train_tiny(tmp_path)
    ckpt = torch.load(ckpt, weights_only=True)
    other = dict(arch="resnet34", blocks="12,3,4", pooling="gsp", head_dim="64", kernel_size="3", groups="2",
                 projector="32-32", loss="vicreg", lambd="0.1", target="0.9", scale_loss="0.5", temperature="0.5",
                 noise="0.5", mode="sequential", frozen="1", init="x.pth", augmentations="adaptive", batch_size="4",
                 lr="0.1", warmup_epochs="0.5", weight_decay="0", lars_eta="0.01", grad_scale="0.5",
                 dataset="fake", limit="4", image_size="40", crop_scale="0.5", seed="1", bf16=None, patch_size="8",
                 mask="0.5", mask_views="both", optimizer="adamw", route="below", route_weight="0.25")
    base = [*SMALL, "--data", "d", "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "8"]
    changing = [k for k in vars(train.get_args(base)) if k not in bookkeeping.RESUMABLE]
    assert sorted(changing) == sorted(other)  # a new flag must be placed: resumable, or tested here
    for key in changing:
        flag = "--" + key.replace("_", "-")
        args = train.get_args(base + ([flag] if other[key] is None else [flag, other[key]]))
        with pytest.raises(bookkeeping.Abort) as e:
            bookkeeping.check_resume(ckpt, bookkeeping.model_config(args, 2), args, ckpt["data"], "ckpt", 1)
        assert flag in str(e.value) or f"{key} " in str(e.value) or key == "projector" and "projector" in str(e.value)


def test_a_rerun_on_another_dataset_is_refused_a_moved_one_resumes(tmp_path, capsys):
    data, _ = train_tiny(tmp_path)  # 2 classes x 8 images
    other = image_folder(tmp_path / "other", per_class=4, classes=4)  # 16 images too, other classes
    base = [*SMALL, "--out", str(tmp_path / "run"), "--batch-size", "8", "--epochs", "2"]
    expect_one_line_error(capsys, base + ["--data", other], "other class names")
    shutil.move(data, tmp_path / "moved")
    train.main(train.get_args(base + ["--data", str(tmp_path / "moved")]))
    assert weights(tmp_path / "run")["epoch"] == 2


def test_resuming_with_another_number_of_processes_is_said(tmp_path):
    """2 processes stopped after epoch 1, resumed in 1: allowed, said in one line and in log.jsonl."""
    data = image_folder(tmp_path / "data", per_class=4)
    argv = ["train.py", "--data", data, "--out", str(tmp_path / "run"), *SMALL, "--batch-size", "8"]
    assert torchrun(*argv, "--epochs", "1").returncode == 0
    r = subprocess.run([sys.executable, *argv, "--epochs", "2"], cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 0 and "resuming a run of 2 process(es) with 1" in r.stdout, r.stderr[-2000:]
    assert [e["note"][:30] for e in step_log(tmp_path / "run", "resume")] == ["resuming a run of 2 process(es) "[:30]]


def test_every_run_records_where_it_ran(tmp_path):
    data, ckpt = train_tiny(tmp_path)
    first = json.loads(open(tmp_path / "run" / "log.jsonl").readline())
    env = weights(tmp_path / "run")["env"]
    for e in (first["env"], env):
        assert e["torch"] == str(torch.__version__) and e["torchvision"] == str(torchvision.__version__)
        assert e["processes"] == 1 and e["python"] and e["device"] and e["command"]
    assert env["commit"] is None or len(env["commit"].split()[0]) == 40
    res = probe.main(probe_args(ckpt, data, "--fast", "--out", str(tmp_path / "p")))
    assert json.load(open(tmp_path / "p" / "probe.json"))["env"]["torch"] == str(torch.__version__) and res["env"]


# ====================================================================================================
# Failure handling: every failure is one line, and loses nothing
# ====================================================================================================


def test_bad_input_gets_one_line(tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    base = [*SMALL, "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "out")]
    os.makedirs(tmp_path / "empty" / "train")
    (tmp_path / "file").write_text("")
    bad = image_folder(tmp_path / "bad")
    (tmp_path / "bad" / "train" / "class0" / "3.png").write_bytes(b"not a png")
    cases = [(["--data", str(tmp_path / "nope")], "no train/ folder"),
             (["--data", str(tmp_path / "empty")], "class folder"),
             (["--data", data, "--pooling", "xyz"], "invalid choice"),
             (["--data", data, "--loss", "byol"], "invalid choice"),
             (["--data", data, "--blocks", "13"], "consecutive stages"),
             (["--data", data, "--frozen", "1,2,3,4"], "not all"),
             (["--data", data, "--lambd", "0.1,0.2"], "one per block"),
             (["--data", data, "--batch-size", "64"], "larger than"),
             (["--data", data, "--out", str(tmp_path / "file" / "out")], "not writable"),
             (["--data", str(bad), "--workers", "1"], "3.png"),
             (["--dataset", "cifar10", "--data", str(tmp_path / "cifar")], "download failed")]
    for extra, fragment in cases:
        expect_one_line_error(capsys, base + extra, fragment)
    run_train(data, tmp_path / "run", "--epochs", "1", "--batch-size", "8")
    expect_one_line_error(capsys, [*SMALL, "--data", data, "--out", str(tmp_path / "run"), "--pooling", "gsp"],
                          "holds a different model")


def test_bad_flags_are_refused_up_front_naming_the_flag(tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    base = [*SMALL, "--data", data, "--out", str(tmp_path / "out")]
    for extra, flag in ((["--epochs", "0"], "--epochs"), (["--batch-size", "0"], "--batch-size"),
                        (["--print-freq", "0"], "--print-freq"), (["--head-dim", "0"], "--head-dim"),
                        (["--kernel-size", "2"], "--kernel-size"), (["--kernel-size", "0"], "--kernel-size"),
                        (["--projector", "0-0-0"], "--projector"), (["--lr", "-1"], "--lr"),
                        (["--noise", "-0.1"], "--noise"), (["--workers", "-1"], "--workers"),
                        (["--limit", "-5"], "--limit"), (["--epochs", "2", "--warmup-epochs", "3"], "--warmup-epochs"),
                        (["--init", "x.pth"], "--init")):
        expect_one_line_error(capsys, base + extra, flag)
    assert not (tmp_path / "out" / "checkpoint.pth").exists()
    _, ckpt = train_tiny(tmp_path)
    for extra, flag in ((["--knn", "0"], "--knn"), (["--epochs", "0"], "--epochs"),
                        (["--corruptions", str(tmp_path / "nowhere")], "--corruptions"),
                        (["--corruptions", str(tmp_path / "data" / "val" / "class0")], "--corruptions")):
        expect_one_line_error(capsys, probe_argv(ckpt, data, *extra), flag, entry=probe)


def test_unknown_config_keys_and_bad_values_are_named(trained, tmp_path, capsys):
    """A checkpoint from a newer release (an unknown config key) is refused by probe.py and train.py, naming the
    key; flags whose value cannot make a model name the flag; WORLD_SIZE without torchrun is one line."""
    data, ckpt = trained
    bad = torch.load(ckpt, weights_only=True)
    bad["config"]["patch_size"] = 4
    os.makedirs(tmp_path / "new")
    torch.save(bad, tmp_path / "new" / "checkpoint.pth")
    expect_one_line_error(capsys, probe_argv(str(tmp_path / "new" / "checkpoint.pth"), data), "'patch_size'",
                          entry=probe)
    base = [*SMALL, "--data", data, "--batch-size", "8", "--epochs", "1"]
    expect_one_line_error(capsys, base + ["--out", str(tmp_path / "new")], "'patch_size'")
    out = ["--out", str(tmp_path / "x")]
    for extra, flag in ((["--groups", "3"], "--groups 3"), (["--target", "abc"], "--target"),
                        (["--seed", str(2 ** 64)], "--seed"), (["--pooling", "lsp", "--head-dim", "64"], "--head-dim"),
                        (["--batch-size", "1"], "--batch-size 1"), (["--frozen", "a"], "--frozen"),
                        (["--augmentations", "hard"], "--augmentations"), (["--device", "cuda"], "--device cuda")):
        if extra[0] == "--device" and torch.cuda.is_available():
            continue
        expect_one_line_error(capsys, base + out + extra, flag)
    expect_one_line_error(capsys, probe_argv(ckpt, data, "--blocks-to-probe", "a"), "--blocks-to-probe", entry=probe)
    r = subprocess.run([sys.executable, "train.py", *base, *out], cwd=HERE, capture_output=True, text=True,
                       env={**os.environ, "WORLD_SIZE": "2"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "torchrun" in r.stderr, r.stderr


def test_gpu_only_options_without_a_gpu_are_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is usable here")
    data = image_folder(tmp_path / "data")
    base = [a for a in SMALL if a not in ("--device", "cpu")] + ["--data", data, "--out", str(tmp_path / "o")]
    for extra in (["--bf16"], ["--gpu-aug"]):
        expect_one_line_error(capsys, base + extra, f"{extra[0]} but no usable GPU")


def test_one_run_per_output_folder(tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    os.makedirs(tmp_path / "out")
    code = (f"import bookkeeping, sys; lock = bookkeeping.FolderLock({str(tmp_path / 'out')!r}); print(flush=True); "
            "sys.stdin.read()")
    other = subprocess.Popen([sys.executable, "-c", code], cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    other.stdout.readline()  # another run holds the folder
    argv = [*SMALL, "--data", data, "--out", str(tmp_path / "out")]
    expect_one_line_error(capsys, argv, f"in use by pid {other.pid}")
    other.communicate(b"")
    run_train(data, tmp_path / "out", "--epochs", "1", "--batch-size", "8")  # released: the folder is free again


def test_unreadable_checkpoints_and_init_files_are_one_line(tmp_path, capsys):
    data, ckpt = train_tiny(tmp_path)
    base = [*SMALL, "--data", data, "--batch-size", "8", "--epochs", "2"]
    for name, content in (("empty", b""), ("trunk", open(tmp_path / "run" / "trunk.pth", "rb").read())):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "checkpoint.pth").write_bytes(content)
        expect_one_line_error(capsys, base + ["--out", str(tmp_path / name)], "checkpoint.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    expect_one_line_error(capsys, base + ["--out", str(tmp_path / "x"), "--frozen", "1", "--init",
                                          str(tmp_path / "empty.pth")], "--init")
    expect_one_line_error(capsys, probe_argv(str(tmp_path / "empty.pth"), data), "cannot read", entry=probe)


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path):
    """A full disk, made real with a file-size limit in a child process: one line, nothing half-written."""
    path = tmp_path / "checkpoint.pth"
    torch.save({"old": torch.zeros(1)}, path)
    code = ("import resource, signal, sys, torch, bookkeeping\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
            f"try:\n    bookkeeping.save_atomic({{'new': torch.zeros(1 << 20)}}, {str(path)!r})\n"
            "except bookkeeping.Abort as e:\n    print(e)\n    sys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 3 and "cannot write" in r.stdout and "previous checkpoint.pth is kept" in r.stdout
    assert os.listdir(tmp_path) == ["checkpoint.pth"] and "old" in torch.load(path, weights_only=True)


def test_a_shorter_rerun_is_refused_naming_both(tmp_path, capsys):
    data, _ = train_tiny(tmp_path)
    base = [*SMALL, "--data", data, "--out", str(tmp_path / "run"), "--batch-size", "8"]
    train.main(train.get_args(base + ["--epochs", "2"]))
    trunk = os.path.getmtime(tmp_path / "run" / "trunk.pth")
    err = expect_one_line_error(capsys, base + ["--epochs", "1"], "--epochs 1: ")
    assert "already run 2 epochs" in err
    assert os.path.getmtime(tmp_path / "run" / "trunk.pth") == trunk


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    run_train(data, tmp_path / "out", "--epochs", "1", "--batch-size", "8")
    good = weights(tmp_path / "out")
    good["args"]["lr"] = 1e30  # the same run, had it been started with a diverging lr (a rerun may not change it)
    torch.save(good, tmp_path / "out" / "checkpoint.pth")
    err = expect_one_line_error(capsys, [*SMALL, "--data", data, "--out", str(tmp_path / "out"), "--epochs", "4",
                                         "--batch-size", "8", "--lr", "1e30"], "loss of block")
    assert "step" in err and "last good state" in err
    kept = weights(tmp_path / "out")
    assert kept["epoch"] == 1 and all(torch.equal(good["model"][k], kept["model"][k]) for k in good["model"])


@pytest.mark.parametrize("moment", ["mid-epoch", "between epochs"])
def test_a_killed_data_loading_worker_saves_then_says_why(tmp_path, moment):
    """A worker killed (the out-of-memory killer's SIGKILL) in the middle of an epoch, or after one (the workers
    persist, and the next epoch finds it dead when it starts them): the steps done are saved, one line names the
    likely cause, exit 2; the rerun resumes from there and finishes."""
    data = image_folder(tmp_path / "data", per_class=16)
    cmd = [sys.executable, "train.py", "--data", data, *SMALL, "--epochs", "2", "--batch-size", "8", "--workers", "2",
           "--out", str(tmp_path / "out")]
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(p, tmp_path / "out")
    while moment == "between epochs" and p.poll() is None and not (tmp_path / "out" / "checkpoint.pth").exists():
        time.sleep(0.01)
    os.kill(child_pids(p.pid)[0], signal.SIGKILL)
    stdout, stderr = p.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "a data-loading worker died" in lines[0], stderr[-2000:]
    saved = weights(tmp_path / "out")
    assert "--workers" in lines[0] and "saved" in lines[0] and (saved["epoch"], saved["step"]) > (0, 0)
    subprocess.run(cmd, cwd=HERE, check=True, capture_output=True)
    assert weights(tmp_path / "out")["epoch"] == 2


def child_pids(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def test_every_rank_names_its_own_failure(tmp_path):
    """A corrupt image that rank 1 reads: rank 1 says so in one line naming itself and the file; rank 0 stops."""
    data = image_folder(tmp_path / "data", per_class=4)
    ds = load_dataset("folder", data)
    sampler = torch.utils.data.DistributedSampler(ds, 2, 1, shuffle=True, seed=0, drop_last=True)
    sampler.set_epoch(0)
    bad = ds.samples[list(sampler)[0]][0]
    open(bad, "wb").write(b"not an image")
    r = torchrun("train.py", "--data", data, "--out", str(tmp_path / "out"), *SMALL, "--batch-size", "8",
                 "--workers", "2", timeout=120)  # read by a worker; the run must still exit, not wait for it
    mine = [line for line in r.stderr.splitlines() if line.startswith("train.py: error:")]
    assert r.returncode != 0 and any(line.startswith("train.py: error: rank 1: unreadable image") and
                                     os.path.basename(bad) in line and "replace the file" in line
                                     for line in mine), r.stderr[-3000:]


def rank_pid(marker, rank):
    """The pid of the torchrun worker of that rank whose command line holds `marker`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and marker.encode() in cmdline and b"distributed.run" not in cmdline:
            return int(pid)


@pytest.mark.parametrize("stages", [[], ["--stages", "1,234", "--monitor-every", "0"]], ids=["replicas", "stages"])
def test_a_stalled_rank_stops_the_run_within_the_timeout(tmp_path, stages):
    """Rank 1 frozen (SIGSTOP): rank 0 gives up after --timeout (6 s here) with one line, instead of hanging; in a
    pipeline the line names its stage too."""
    data = image_folder(tmp_path / "data", per_class=16)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--data", data, "--out", out, *SMALL, "--batch-size", "8", "--epochs", "20", "--timeout", "0.1",
           *stages]
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not os.path.exists(os.path.join(out, "log.jsonl")) and p.poll() is None:
            time.sleep(0.05)
        stalled, waiting = rank_pid(out, 1), rank_pid(out, 0)
        os.kill(stalled, signal.SIGSTOP)
        t0 = time.time()
        while os.path.exists(f"/proc/{waiting}") and time.time() - t0 < 120:
            time.sleep(0.2)
        assert time.time() - t0 < 60, "rank 0 hung"
    finally:
        with contextlib.suppress(Exception):
            os.kill(stalled, signal.SIGKILL)
        stderr = p.communicate(timeout=120)[1]
    who = "rank 0 (stage 0): " if stages else "rank 0: "
    assert f"train.py: error: {who}stopped: another process failed or did not answer within --timeout" in stderr


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """A node's scheduler signals only its own processes: rank 1 gets SIGTERM; both stop at the same step, rank 0
    saves and says why, exit 0, and the rerun resumes."""
    data = image_folder(tmp_path / "data", per_class=16)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--data", data, "--out", out, *SMALL, "--batch-size", "8", "--epochs", "2"]
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(p, out)
    os.kill(rank_pid(out, 1), signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0 and "another process was signalled: saved" in stdout, stderr[-3000:]
    assert "Traceback" not in stderr and weights(out)["step"] > 0
    r = torchrun(*cmd[5:])
    assert r.returncode == 0 and weights(out)["epoch"] == 2, r.stderr[-3000:]


def test_torchrun_restarts_a_run_whose_process_died(tmp_path):
    """torchrun --max-restarts=1, rank 1 killed mid-run: the other rank stops, torchrun starts both again, they join
    a fresh process group (torchrun's store is shared across restarts: each restart keys its own) and resume from
    the last checkpoint, ending as the uninterrupted run."""
    data = image_folder(tmp_path / "data", per_class=16)
    out = str(tmp_path / "out")
    argv = ["train.py", "--data", data, *SMALL, "--batch-size", "8", "--epochs", "2", "--monitor-every", "0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1"]
    p = subprocess.Popen(cmd + argv + ["--out", out], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    wait_for_step(p, out)
    os.kill(rank_pid(out, 1), signal.SIGKILL)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0 and "all 2 ranks hold identical weights" in stdout, stderr[-3000:]
    assert torchrun(*argv, "--out", str(tmp_path / "ref")).returncode == 0
    assert_same_run(weights(tmp_path / "ref"), weights(out))


def test_batch_not_divisible_by_world_size(tmp_path):
    data = image_folder(tmp_path / "data")
    r = torchrun("train.py", "--data", data, "--out", str(tmp_path / "out"), *SMALL, "--batch-size", "7")
    for rank in (0, 1):  # every rank says what stopped it, naming itself
        assert r.returncode != 0 and r.stderr.count(f"train.py: error: rank {rank}: --batch-size 7 is not divisible "
                                                    "by the 2 processes") == 1


def test_probe_keeps_finished_parts_on_a_signal_and_locks_its_folder(trained, tmp_path, capsys):
    """SIGTERM during the --untrained pass: the trained network's results are in probe.json, one line says so, exit
    128 + 15. A second probe on the same --out is refused while the first runs; an --out that cannot be made is
    refused at the start. The untrained pass is held by an --init file that is a FIFO, opened but never written."""
    data, ckpt = trained
    held = torch.load(ckpt, weights_only=True)
    os.mkfifo(tmp_path / "fifo")
    held["args"].update(frozen="1", init=str(tmp_path / "fifo"))
    torch.save(held, tmp_path / "held.pth")
    argv = [sys.executable, "probe.py", *probe_argv(str(tmp_path / "held.pth"), data, "--untrained", "--fast",
                                                     "--out", str(tmp_path / "p"))]
    p = subprocess.Popen(argv, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while p.poll() is None and not (tmp_path / "p" / "probe.json").exists():
        time.sleep(0.05)
    r = subprocess.run(argv, cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 2 and "in use by pid" in r.stderr, r.stderr
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM and stderr.strip().endswith("probe.json holds the parts that were "
                                                                              "finished (blocks)"), stderr[-2000:]
    saved = json.load(open(tmp_path / "p" / "probe.json"))
    assert len(saved["blocks"]) == 4 and "untrained" not in saved
    (tmp_path / "file").write_text("")
    expect_one_line_error(capsys, probe_argv(ckpt, data, "--out", str(tmp_path / "file" / "p")), "not writable",
                          entry=probe)


def test_probe_refuses_a_mismatched_checkpoint(trained, tmp_path, capsys):
    data, ckpt = trained
    for extra in (["--arch", "resnet50"], ["--pooling", "gsp"], ["--blocks", "12,3,4"]):
        expect_one_line_error(capsys, probe_argv(ckpt, data, *extra), "not the", entry=probe)
    bad = torch.load(ckpt, weights_only=True)
    bad["config"]["pooling"] = "gsp"  # weights of CbE heads under a GSP config
    torch.save(bad, tmp_path / "bad.pth")
    expect_one_line_error(capsys, probe_argv(str(tmp_path / "bad.pth"), data), "does not match", entry=probe)
    expect_one_line_error(capsys, probe_argv(str(tmp_path / "run" / "nothing.pth"), data), "cannot read", entry=probe)


def test_bench_hands_its_sizes_to_the_measuring_process():
    """bench.py runs each configuration in a process of its own with the same sizes: its command line must parse
    back to them (a store_true flag written as --layouts=False once broke every measurement)."""
    args = bench.get_args(["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--layouts",
                           "--traffic", "8", "--steps", "2"])
    back = bench.get_args(bench.worker_argv(args, "ours fp32"))
    assert back.worker == "ours fp32" and not back.layouts and not back.traffic
    assert all(getattr(back, k) == v for k, v in vars(args).items() if k not in ("worker", "layouts", "traffic"))


def test_bench_refuses_bad_flags_in_one_line(tmp_path, capsys):
    for extra, says in ((["--steps", "0"], "--steps"), (["--arch", "resnet99"], "--arch"),
                        (["--projector", "abc"], "--projector"), (["--configs", "nope"], "--configs"),
                        (["--loop", "--dataset", "folder", "--data", str(tmp_path)], "no train/ folder")):
        expect_one_line_error(capsys, extra, says, entry=bench)


def test_processes_that_cannot_connect_say_which_variable_to_set(tmp_path):
    """Several nodes: the host group's first exchange happens at set-up, and a wrong network interface (here
    one that does not exist) ends every process with one line naming GLOO_SOCKET_IFNAME."""
    data = image_folder(tmp_path / "data", per_class=2)
    r = torchrun("train.py", "--data", data, "--out", str(tmp_path / "out"), *SMALL, "--batch-size", "4",
                 env={**os.environ, "GLOO_SOCKET_IFNAME": "nonexistent0"}, timeout=120)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("train.py: error")]
    assert errors and all("GLOO_SOCKET_IFNAME" in line for line in errors), r.stderr[-2000:]


def test_checkpoints_are_written_in_the_background_from_a_copy(tmp_path, monkeypatch):
    """save_checkpoint returns once the state is copied; the run may change its tensors while the write goes on;
    wait_for_save waits for it, and raises a failed write's one-line error."""
    monkeypatch.setenv("BLOCKWISE_SLOW_SAVE", "1")
    w, path = torch.zeros(3), tmp_path / "checkpoint.pth"
    save = functools.partial(bookkeeping.save_checkpoint, epoch=1, step=0, config={},
                             args=train.get_args(["--data", "x"]), data={})
    save(str(path), ({"w": w}, {}))
    w += 1  # the next step, while the write is under way
    assert not path.exists()
    bookkeeping.wait_for_save()
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.zeros(3))
    (tmp_path / "a folder").mkdir()
    save(str(tmp_path / "a folder"), ({"w": w}, {}))
    with pytest.raises(bookkeeping.Abort, match="cannot write"):
        bookkeeping.wait_for_save()


def test_after_a_failure_every_process_waits_for_the_save(tmp_path):
    """Rank 1 reads a corrupt image at step 2; rank 0's save then takes 3 s (a slow disk, for tests only).
    torchrun ends every process once one exits, so rank 1 must wait, on the host, for the save to be whole
    before it reports: when rank 1 has exited, the checkpoint of the 2 steps done is on disk."""
    data = image_folder(tmp_path / "data", per_class=16)
    ds = load_dataset("folder", data)
    sampler = torch.utils.data.DistributedSampler(ds, 2, 1, shuffle=True, seed=0, drop_last=True)
    sampler.set_epoch(0)
    open(ds.samples[list(sampler)[8]][0], "wb").write(b"not an image")  # rank 1's third batch of 4
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--data", data, "--out", str(out), *SMALL, "--batch-size", "8", "--monitor-every", "0"]
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "BLOCKWISE_SLOW_SAVE": "3"})
    pid = None
    while pid is None and p.poll() is None:
        pid = rank_pid(str(out), 1)
    while pid and not exited(pid):
        time.sleep(0.01)
    written = (out / "checkpoint.pth").exists()
    _, stderr = p.communicate(timeout=300)
    assert p.returncode != 0 and "rank 1: unreadable image" in stderr, stderr[-3000:]
    assert written and (weights(out)["epoch"], weights(out)["step"]) == (0, 2)


def exited(pid):
    """Whether the process has ended (gone, or a zombie its parent has not yet reaped)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_impossible_or_idle_flags_are_refused_naming_a_value_that_works(tmp_path, capsys):
    """Refused before anything starts, in one line naming the flag (and, where there is one, a value that works):
    blocks out of order, with a gap or a repeat; a value out of range; a ViT mask that leaves a block no token;
    routing with a block's share too small for BatchNorm; an LSP width that some block cannot pool into; a flag
    with no effect in the configuration; App. A's four view sets for LoCo's three blocks."""
    base = [*SMALL, "--data", image_folder(tmp_path / "data"), "--out", str(tmp_path / "out"), "--batch-size", "8"]
    a_vit = ["--arch", "vit_tiny", "--patch-size", "16"]
    for extra, says in ((["--blocks", "4,3,2,1"], "in order from stage 1"),
                        (["--blocks", "1,1,2,3,4"], "no repeat"), (["--blocks", "1,3,4"], "no gap"),
                        (["--lambd", "-1"], "--lambd -1: "), (["--target", "2"], "--target 2: "),
                        ([*a_vit, "--mask", "0.9"], "use at most 0.75"),
                        (["--route", "below", "--batch-size", "6"], "--batch-size 8 or more"),
                        (["--pooling", "lsp", "--head-dim", "128"], "e.g. --head-dim 512"),
                        ([*a_vit, "--kernel-size", "3"], "--kernel-size 3: no effect"),
                        ([*a_vit, "--groups", "2"], "--groups 2: no effect"),
                        (["--route-weight", "0.3"], "--route-weight 0.3: no effect"),
                        (["--optimizer", "adamw", "--lars-eta", "0.02"], "--lars-eta 0.02: no effect"),
                        (["--optimizer", "adamw", "--grad-scale", "0.5"], "--grad-scale 0.5: no effect"),
                        (["--augmentations", "adaptive", "--blocks", "loco", "--mode", "sequential"],
                         "4 sets for 3 blocks")):
        expect_one_line_error(capsys, base + extra, says)
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_bench_measures_each_configurations_own_peak_memory():
    """bench.py's CPU memory process runs nothing before the two measured steps (a FLOP count's eager step, with
    recomputation off, used to set every configuration's peak): recomputing CbE's maps must read well below the
    plain step on a model whose heads' maps dominate."""
    above = {}
    for config in ("ours fp32", "ours fp32 ckpt-head"):
        argv = ["--arch", "resnet18", "--image-size", "64", "--batch-size", "32", "--projector", "64-64",
                "--head-dim", "2048", "--worker", config, "--worker-memory"]
        r = subprocess.run([sys.executable, "bench.py", *argv], cwd=HERE, capture_output=True, text=True,
                           env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        row = json.loads(r.stdout.strip().splitlines()[-1])
        above[config] = row["peak_mib"] - row["runtime_mib"]
    assert above["ours fp32 ckpt-head"] < 0.8 * above["ours fp32"], above


def test_probe_refuses_a_vit_at_another_image_size(tmp_path, capsys):
    """A ViT's position embeddings fit the size it was trained at: another --image-size is one line naming it."""
    data = image_folder(tmp_path / "data")
    run_train(data, tmp_path / "vit", "--epochs", "1", "--batch-size", "8", "--arch", "vit_tiny", "--patch-size", "8",
              "--monitor-every", "0")
    ckpt = str(tmp_path / "vit" / "checkpoint.pth")
    expect_one_line_error(capsys, probe_argv(ckpt, data, "--image-size", "64"), "trained at 32 px", entry=probe)
