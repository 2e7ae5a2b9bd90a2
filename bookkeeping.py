"""A run's files, kept safe: the output folder (writable, seen by every process, locked by one run), checkpoints
written atomically as CPU tensors and read back with one-line errors, what a resumed run must keep the same, where
the run ran, and log.jsonl. Nothing here is the method."""
import contextlib
import errno
import fcntl
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid

import inspect

import torch

import distributed
from blockwise import BlockResNet
from cli import Abort, one_line
from vit import VITS, BlockViT, masks
import pipeline
import recompute

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------- the output folder

class FolderLock:
    """One run per output folder: an exclusive POSIX lock on OUT/.lock, which names its holder, for the run's life
    (not inherited by the data-loading workers that fork). A filesystem without locks (Lustre mounted without
    flock, some NFS) is said once and the run goes on unlocked."""

    def __init__(self, folder, what="run", name=".lock"):
        self.path = os.path.join(folder, name)
        self.file = open(self.path, "a+")
        try:
            fcntl.lockf(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                print(f"--out {folder}: this filesystem cannot lock files ({e.strerror}); another {what} using "
                      "this folder would not be noticed", flush=True)
                return
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            raise Abort(f"--out {folder} is in use by {holder}; wait for it or choose another --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()  # releases the lock


def prepare_out(out, what="run", lock=".lock"):
    """The output folder: created, writable by every process, one folder that every process sees (a resumed run
    reads what rank 0 wrote), and locked by rank 0 (in the file `lock`) for the run's life. Returns the lock's
    context."""
    rank = distributed.rank()
    try:
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, f".write-test-{rank}"), "w").close()
        os.remove(os.path.join(out, f".write-test-{rank}"))
    except OSError as e:
        raise Abort(f"--out {out} is not writable ({e.strerror})") from None
    if distributed.world() > 1:
        check_shared(out)
    return FolderLock(out, what, lock) if rank == 0 else contextlib.nullcontext()


def check_shared(out):
    """Rank 0 writes a marker file; every process must see it (node-local disks would resume some ranks only)."""
    token = torch.tensor(float(uuid.uuid4().int % 2 ** 24) if distributed.rank() == 0 else 0.0)
    distributed.broadcast(token)  # torch.tensor of a float: the token travels on the group's device and back
    marker = os.path.join(out, f".shared-{int(token.item())}")
    if distributed.rank() == 0:
        open(marker, "w").close()
    distributed.agree(True)  # a barrier on the host
    blind = distributed.first_rank_with(not os.path.exists(marker))
    distributed.agree(True)
    if distributed.rank() == 0:
        os.remove(marker)
    if blind is not None:
        raise Abort(f"--out {out} is not one folder shared by every process (rank {blind} cannot see rank 0's "
                    "files): use a shared filesystem")


def check_free_space(out, model):
    """A checkpoint (weights, BN statistics, LARS momentum) must fit, with its temporary copy, before we start."""
    need = 2.2 * sum(t.numel() * t.element_size() for t in [*model.state_dict().values(), *model.parameters()])
    free = shutil.disk_usage(out).free
    if free < need:
        raise Abort(f"--out {out} has {free / 2**30:.2f} GiB free; a checkpoint needs about {need / 2**30:.2f} GiB")


# ---------------------------------------------------------------- checkpoints

def to_cpu(obj):
    """Tensors copied to the host, in nested dicts and lists: a checkpoint saved on a GPU loads on any machine,
    and one written in the background holds the state of the moment it was taken."""
    if isinstance(obj, torch.Tensor):
        out = obj.detach().cpu()
        return out.clone() if out.data_ptr() == obj.data_ptr() else out  # a copy the run cannot change
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_atomic(obj, path):
    """Write a temporary file of this process's own, flush it to disk, then rename: a crash mid-write leaves
    the previous file whole; a full disk leaves no partial file behind. Raises Abort (one line)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(to_cpu(obj), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**30
        if getattr(e, "errno", None) == errno.ENOSPC:
            why = f"no space left on the device: {free:.2f} GiB free"
        elif "unexpected pos" in str(e):  # torch's zip writer, whatever the OS said
            why = f"the write failed with {free:.2f} GiB free on the device: a full disk, or a file-size limit"
        else:
            why = one_line(e)
        raise Abort(f"cannot write {path} ({why}); the previous {os.path.basename(path)} is kept") from None


def load(path, needs=(), what="checkpoint"):
    """The one way to read a file of ours: train.py's checkpoint.pth or trunk.pth, to the host, as plain types
    (weights_only). `needs`: keys it must hold. Raises Abort (one line) for a missing, empty, truncated or
    foreign file."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # written atomically, so this is not our own interrupted write
        raise Abort(f"cannot read {what} {path} ({one_line(e)[:200]})") from None
    if not isinstance(obj, dict) or not set(needs) <= obj.keys():
        kind = "a trunk.pth" if isinstance(obj, dict) and "conv1.weight" in obj else "another kind of file"
        raise Abort(f"{what} {path} is not a train.py checkpoint.pth (it looks like {kind})")
    return obj


WRITING = []  # the checkpoint write under way in the background, and its error if it failed


def save_checkpoint(path, state, epoch, step, config, args, data, **extra):
    """What a resumed run needs: `state`, the weights and optimizer state (LARS momentum) of the whole model, where
    to go on from, the model's config, the flags, the training set's fingerprint, the number of processes, where the
    run ran, and `extra` (routing's table). Copied to the host now, written in the background (save_atomic: a
    crash mid-write leaves the previous checkpoint whole), so that no GPU waits for the disk; wait_for_save()
    waits for it. One write at a time."""
    wait_for_save()
    snapshot = to_cpu(dict(model=state[0], optimizer=state[1], epoch=epoch, step=step, config=config,
                           args=vars(args), data=data, world=distributed.dp_world(), env=environment(), **extra))

    def write():
        try:
            time.sleep(float(os.environ.get("BLOCKWISE_SLOW_SAVE", 0)))  # for tests only: a slow disk
            save_atomic(snapshot, path)
        except Exception as e:  # raised in the main thread by wait_for_save
            WRITING.append(e if isinstance(e, Abort) else Abort(f"cannot write {path} ({one_line(e)})"))
    WRITING.append(threading.Thread(target=write, name="checkpoint write"))  # not a daemon: exit waits for it
    WRITING[-1].start()


def wait_for_save(every_process=False):
    """Until the last checkpoint is on disk (`every_process`: every process waits for rank 0's, on the host).
    Raises Abort (one line) if its write failed."""
    try:
        while WRITING:
            done = WRITING.pop(0)
            if isinstance(done, Abort):
                raise done
            done.join()
    finally:
        if every_process:
            distributed.host_barrier()


# ---------------------------------------------------------------- the network of a checkpoint

LEGACY_KEYS = ("checkpoint_heads", "checkpoint")  # earlier releases kept the recompute mode in the config


def network(config, seed, frozen=(), init=""):
    """The network that train.py builds from `config` (the model's arguments, as checkpoints hold them) with
    `seed`, before any step: the --frozen blocks take their trunk weights from `init` (Fig. 7). A key this version
    does not know is refused (one line), rather than dropped or crashing."""
    config = {k: v for k, v in config.items() if k not in LEGACY_KEYS}
    kind = BlockViT if config.get("arch") in VITS else BlockResNet
    unknown = [k for k in config if k not in inspect.signature(kind).parameters]
    if unknown:
        raise Abort(f"the checkpoint's model config has {unknown[0]!r}, which this version does not know "
                    "(a newer release wrote it?)")
    torch.manual_seed(seed)
    model = kind(**config)
    if init:
        load_frozen_init(model, init, frozen)
    return model


def load_frozen_init(model, path, frozen):
    """Fig. 7: the `frozen` blocks take their trunk weights from another run (trunk.pth or checkpoint.pth)."""
    sd = load(path, what="--init")
    sd = sd["model"] if "model" in sd else model.own_names(sd)  # a checkpoint.pth, or a trunk.pth
    prefixes = tuple(p for k in frozen for s in model.blocks[k] for p in model.stage_keys(s))
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    bad = [k for k in own if k not in sd or sd[k].shape != own[k].shape]
    if bad:
        raise Abort(f"--init {path}: missing or mis-shaped weights for the frozen blocks, e.g. {bad[0]}")
    model.load_state_dict({k: sd[k] for k in own}, strict=False)


def model_config(args, num_classes):
    """The arguments of BlockResNet (or vit.BlockViT), stored in every checkpoint so probe.py and
    resume rebuild the model exactly."""
    widths = [int(w) for w in args.projector.split("-")]
    if args.loss == "supervised":  # §3.4: the projector's last layer outputs the classes
        widths[-1] = num_classes
    config = dict(arch=args.arch, blocks=args.blocks, pooling=args.pooling, head_dim=args.head_dim,
                  noise=args.noise, projector_widths=widths)
    if args.arch in VITS:
        return dict(config, image_size=args.image_size, patch_size=args.patch_size)
    return dict(config, kernel_size=args.kernel_size, groups=args.groups)


def build(config, args, device, frozen=()):
    """The model, with the same initial weights in every process (seeded; --init fills the --frozen
    blocks), on its device, BatchNorm over the global batch under torchrun (distributed.py), the
    --recompute mode, compiled
    heads, and the ViT's masks of §6 (--mask)."""
    model = network(config, args.seed, frozen, args.init)
    if distributed.active():
        distributed.sync_batchnorm(model)
    model.to(device, memory_format=torch.channels_last if args.channels_last else
             torch.contiguous_format)
    model.mask = masks(args.mask, args.mask_views, len(model.blocks))
    if args.recompute != "none":
        recompute.apply(model, args.recompute)
    if args.compile:
        recompute.compile_heads(model)
    return model


def export_trunk(model, state, args):
    """Every process must hold its first replica's weights; then trunk.pth, torchvision's state_dict, from
    rank 0's `state` (the whole model's, pipeline.Layout.gather_state)."""
    same = distributed.check_replicas(model) if distributed.active() else None
    wait_for_save()
    if distributed.rank() == 0:
        if same:
            print(same, flush=True)
        save_atomic(model.trunk_state_dict(state[0]), os.path.join(args.out, "trunk.pth"))
        kind = "VisionTransformer" if args.arch in VITS else args.arch
        print(f"done: {args.out}/checkpoint.pth, trunk (torchvision {kind} state_dict) in "
              f"{args.out}/trunk.pth", flush=True)


# Flags a resumed run may change: they change neither the model nor its data, only how it is computed (README).
RESUMABLE = {"epochs", "workers", "gpu_aug", "print_freq", "data", "out", "compile", "recompute", "channels_last",
             "monitor_every", "monitor_images", "timeout", "device", "stages"}


def check_resume(ckpt, config, args, data, path, total_epochs):
    """Refuse to resume another run: another model, a flag that changes the run, another training set, or fewer
    epochs than were already run (one line naming both values). Returns a line to print if the number of
    processes changed, else None."""
    saved = ckpt["config"]
    unknown = [k for k in saved if k not in config and k not in LEGACY_KEYS]
    if unknown:
        raise Abort(f"{path}: its model config has {unknown[0]!r}, which this version does not know (a newer "
                    "release wrote it?)")
    diff = [f"{k} {saved.get(k)!r} (asked {v!r})" for k, v in config.items() if k != "noise" and saved.get(k) != v]
    if diff:
        raise Abort(f"{path} holds a different model: " + ", ".join(diff))
    for key, value in vars(args).items():
        old = ckpt["args"].get(key, value)
        if key not in RESUMABLE and old != value:
            flag = "--" + key.replace("_", "-")
            raise Abort(f"{path} was run with {flag} {old}, not {value}: rerun with {flag} {old} or choose another "
                        "--out")
    theirs = ckpt.get("data", dict(images=ckpt.get("images", data["images"]), classes=data["classes"]))
    if theirs != data:
        raise Abort(f"--data {args.data}: {data['images']} training images in {len(data['classes'])} classes, but "
                    f"{path} was trained on {theirs['images']} in {len(theirs['classes'])} classes "
                    f"({'other class names' if theirs['images'] == data['images'] else 'another dataset'})")
    if total_epochs < ckpt["epoch"]:
        raise Abort(f"--epochs {args.epochs}: {path} has already run {ckpt['epoch']} epochs; pass at least that many")
    if ckpt.get("world", distributed.dp_world()) != distributed.dp_world():
        return (f"resuming a run of {ckpt['world']} process(es) with {distributed.dp_world()}: the same images and "
                "schedule and BatchNorm over the same global batch, but §5's noise is drawn per process, so the run "
                f"is not bit for bit the one {ckpt['world']} would have given")
    return None


def resume(run):
    """Resume from checkpoint.pth when rank 0 finds one (rank 0 decides; every process then reads it, as the folder
    is shared); else every process takes rank 0's initial weights. `run`: train.py's (path, model, optimizer, router,
    config, args, data, epochs, log). Returns (epoch, step) to go on from."""
    found, = distributed.agree(distributed.rank() == 0 and os.path.exists(run.path))
    if not found:  # pipeline.py: each stage's replicas take their first one's weights
        for t in run.model.state_dict().values():
            if not t.is_meta:
                distributed.broadcast(t, distributed.dp_first(), distributed.DP)
        return 0, 0
    ckpt = load(run.path, needs=("model", "optimizer", "config", "epoch", "step"))
    note = check_resume(ckpt, run.config, run.args, run.data, run.path, run.epochs)
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    pipeline.own(run.model, run.optimizer)
    if run.router:
        run.router.table.copy_(ckpt["router"])
    run.log(resume=dict(epoch=ckpt["epoch"], step=ckpt["step"]), **(dict(note=note) if note else {}))
    if note and distributed.rank() == 0:  # the steps logged after this line redo those after that checkpoint
        print(note, flush=True)
    return ckpt["epoch"], ckpt["step"]


def fingerprint(train_set):
    """What identifies a training set whatever its folder: its class names and number of images."""
    base = getattr(train_set, "dataset", train_set)  # a --limit subset
    return dict(images=len(train_set), classes=list(getattr(base, "classes", [])))


# ---------------------------------------------------------------- where the run ran, and its log

def environment():
    """The commit (in a git checkout), versions, devices, number of processes and command line of this process."""
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=HERE, capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    cuda = torch.cuda.is_available()
    return dict(commit=commit or None, python=platform.python_version(), torch=str(torch.__version__),
                torchvision=str(__import__("torchvision").__version__), cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if cuda else None,
                nccl=".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
                device=torch.cuda.get_device_name() if cuda else cpu_model(),
                devices=torch.cuda.device_count() if cuda else os.cpu_count(), processes=distributed.world(),
                host=socket.gethostname(), command=shlex.join([os.path.basename(sys.executable), *sys.argv]))


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


class Log:
    """log.jsonl: one JSON object per line, appended by rank 0 only; the only writer of that file."""

    def __init__(self, out):
        self.path = os.path.join(out, "log.jsonl")

    def __call__(self, **entry):
        if distributed.rank() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
