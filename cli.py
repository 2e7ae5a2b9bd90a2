"""The command line of train.py, probe.py and bench.py: flags checked as they are parsed, one-line errors, what
the signals do, and progress lines. Nothing here is the method."""
import argparse
import math
import multiprocessing
import os
import signal
import sys
import time
import traceback

import torch
import torch.distributed as dist

import distributed
from blockwise import parse_blocks
from vit import VITS


class Abort(Exception):
    """A bad input or a failed run, reported as one line without a traceback."""


# ---------------------------------------------------------------- flags

class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the usage of ~40 flags would bury the message)."""

    def __init__(self, doc):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def checked(kind, ok, what):
    """An argparse type: a `kind` (int or float) for which `ok(value)` holds; else argparse names the flag and
    says it must be `what`."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = checked(int, lambda v: v >= 1, "at least 1")
COUNT = checked(int, lambda v: v >= 0, "zero or more")
SEED = checked(int, lambda v: 0 <= v < 2 ** 63, "in [0, 2^63)")
ODD = checked(int, lambda v: v >= 1 and v % 2, "odd and positive (an even kernel grows the map by one)")
POSITIVE = checked(float, lambda v: v > 0, "positive")
NON_NEGATIVE = checked(float, lambda v: v >= 0, "zero or more")
FRACTION = checked(float, lambda v: 0 < v <= 1, "in (0, 1]")


def block_split(text):  # --blocks (blockwise.parse_blocks), checked as it is parsed
    try:
        parse_blocks(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).partition(": ")[2]) from None
    return text


def widths(text):  # --projector
    if not all(w.isdigit() and int(w) > 0 for w in text.split("-")):
        raise argparse.ArgumentTypeError(f"expected positive widths like 8192-8192-8192, not {text}")
    return text


def number_list(text):  # --lambd, --target
    try:
        numbers(text, "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma list of numbers, not {text}") from None
    return text


def numbers(text, flag, n=None, kind=float):
    """'0.0051' or '0.6,0.75,0.9,1.0' -> floats; with `n`, one value is repeated n times and a list must have n.
    Raises ValueError naming `flag`."""
    try:
        vals = [kind(v) for v in str(text).split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text}: expected a number or a comma list of numbers") from None
    if n is not None and len(vals) not in (1, n):
        raise ValueError(f"{flag} {text}: give one value or one per block ({n})")
    return vals * n if n is not None and len(vals) == 1 else vals


def frozen_blocks(text, n):
    """--frozen `text` as 0-based block numbers, checked against the n blocks."""
    try:
        frozen = {int(k) - 1 for k in text.split(",") if k}
    except ValueError:
        frozen = {-1}
    if not frozen <= set(range(n)) or len(frozen) == n:
        raise Abort(f"--frozen {text}: must name some, not all, of blocks 1-{n}")
    return frozen


def check_train_args(args, world):
    """What no single flag can say alone, refused before anything starts, naming the flag."""
    if args.warmup_epochs > args.epochs:
        raise Abort(f"--warmup-epochs {args.warmup_epochs:g}: must be between 0 and --epochs "
                        f"{args.epochs}")
    if args.init and not args.frozen:
        raise Abort(f"--init {args.init}: used with --frozen, which names the blocks it fills")
    if args.batch_size % world:
        raise Abort(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    if args.arch in VITS and args.recompute != "none":
        raise Abort(f"--recompute {args.recompute}: for ResNets only (a ViT has no CbE maps or "
                        "residual units to recompute)")
    if args.arch not in VITS and args.mask != "0":
        raise Abort(f"--mask {args.mask}: masking drops a ViT's patch tokens (--arch vit_tiny, "
                        "vit_small, vit_base)")
    if args.route != "none" and (args.loss != "barlowtwins" or args.mode != "simultaneous"):
        raise Abort(f"--route {args.route}: routes Barlow Twins' examples among blocks trained "
                        "together (--loss barlowtwins, --mode simultaneous)")
    if args.batch_size // world < 2:
        raise Abort(f"--batch-size {args.batch_size}: each of the {world} processes needs at "
                        "least 2 images (BatchNorm's batch statistics)")
    check_values(args, world)


def check_values(args, world):
    """Values out of their range, and flags that would have no effect in this configuration."""
    if min(numbers(args.lambd, "--lambd")) < 0:
        raise Abort(f"--lambd {args.lambd}: Eq. (2)'s weight of the redundancy term is >= 0 "
                    "(the paper: 0.0051)")
    if not all(0 < t <= 1 for t in numbers(args.target, "--target")):
        raise Abort(f"--target {args.target}: a correlation to reach, in (0, 1] (App. A: 0.6 to 1)")
    n = len(parse_blocks(args.blocks))
    share = args.batch_size // world // n  # "below": the last block trains on one share of a batch
    if (args.route == "below" or args.route == "weight" and args.route_weight == 0) and share * world < 2:
        raise Abort(f"--route {args.route}: each block's share of a batch is {share} image(s) per "
                    f"process, BatchNorm needs 2 in all: --batch-size {2 * n * world} or more")
    if args.arch in VITS and args.mask != "0":
        patches = (args.image_size // args.patch_size) ** 2
        if any(round((1 - f) * patches) < 1 for f in numbers(args.mask, "--mask")):
            raise Abort(f"--mask {args.mask}: a block would see none of the {patches} patch tokens "
                        f"({args.image_size} px / --patch-size {args.patch_size}); use at most "
                        f"{1 - 1 / patches:.3g}")
    if args.pooling == "lsp" and args.arch not in VITS:  # §3.3: a power-of-two grid of bins per block
        base = 64 if args.arch in ("resnet18", "resnet34") else 256
        channels = [base * 2 ** (stage - 1) for b in parse_blocks(args.blocks) for stage in b[-1:]]
        if any(args.head_dim % c or (args.head_dim // c) & (args.head_dim // c - 1) for c in channels):
            works = max(channels) * 2 ** max(0, math.ceil(math.log2(args.head_dim / max(channels))))
            listed = ", ".join(map(str, channels))
            raise Abort(f"--head-dim {args.head_dim}: LSP needs each block's channels ({listed}) times "
                        f"a power of two, e.g. --head-dim {works}")
    defaults = dict(kernel_size=1, groups=1, route_weight=0.5, lars_eta=0.001, grad_scale=1.0)
    for flag, without in (("kernel_size", args.arch in VITS and "a ViT has no CbE convolution"),
                          ("groups", args.arch in VITS and "a ViT has no CbE convolution"),
                          ("route_weight", args.route != "weight" and "it weighs --route weight's blocks"),
                          ("lars_eta", args.optimizer != "lars" and "LARS only"),
                          ("grad_scale", args.optimizer != "lars" and "AdamW's step ignores a gradient's "
                                                                       "scale")):
        if without and getattr(args, flag) != defaults[flag]:
            name = "--" + flag.replace("_", "-")
            raise Abort(f"{name} {getattr(args, flag):g}: no effect here ({without}); leave it out")


# ---------------------------------------------------------------- signals and data-loading workers

STOP = []  # the signals asking this process to save at the end of the current step and exit
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


def stop_on_signals():
    """SIGTERM (preemption, scancel), SIGUSR1 (Slurm's --signal warning before a time limit), SIGHUP (a closed
    terminal) or a first Ctrl-C: finish the step, save, exit 0. A second Ctrl-C quits at once."""
    def handler(signum, frame):
        if signum == signal.SIGINT and STOP:
            raise KeyboardInterrupt
        STOP.append(signum)
    for s in STOP_SIGNALS:
        signal.signal(s, handler)


class Stopped(BaseException):
    """A stop signal, raised where the program is (probe.py, which has no step to finish)."""


def raise_on_signals():
    """The stop signals (and a first Ctrl-C) end the program at once, through `run`, which says so."""
    def handler(signum, frame):
        raise Stopped(signum)
    for s in STOP_SIGNALS:
        signal.signal(s, handler)


def quiet_worker(_):
    """DataLoader workers ignore the stop signals: Slurm and Ctrl-C signal the whole process group, and a worker
    that dies first would kill the main process before it saves. Workers exit with their parent."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS))  # see start_workers


def start_workers(loader):
    """The loader's batches, its workers started at the first next(): a worker that died since the last epoch
    (persistent workers) then fails that next(), where any fetch failure is handled. Workers are born with the stop
    signals blocked, so that a signal sent while they start is not lost to them before quiet_worker runs; the main
    process gets its own copy right after. A worker that dies later is noticed where the next batch is fetched
    (torch checks every 5 s), never in the middle of a step: torch's SIGCHLD handler would raise in whatever line
    the main process is running, an optimizer step included."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    try:
        batches = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    yield from batches


def worker_died(e):
    """Whether an error is a data-loading worker that was killed (out of memory, a bus error on a full /dev/shm), or
    that could not hand its batch over (a full /dev/shm), rather than an error in the data itself."""
    text = str(e)
    return any(s in text for s in ("DataLoader worker (pid", "shared memory", "No space left on device"))


# ---------------------------------------------------------------- the entry point

STAGE = ""  # " (stage s)" in a pipeline (pipeline.py): error lines name the process's stage too


def run(main, argv, prog, interrupted="the last checkpoint.pth is kept"):
    """Entry point of train.py, probe.py and bench.py: bad input and failed runs end with one line on stderr and
    exit code 2; under torchrun every failing rank says so, naming itself, and the other ranks stop too."""
    code = 0
    try:
        main(argv)
    except (Abort, ValueError, OSError) as e:
        code = say(f"{prog}: error: {who()}{one_line(e)}", 2)
    except RuntimeError as e:
        if not peer_failure(e):
            raise  # a bug: keep its traceback
        code = say(f"{prog}: error: {who()}stopped: another process failed or did not answer within --timeout "
                   f"({one_line(e)[:200]})", 2)
    except KeyboardInterrupt:
        code = say(f"{prog}: {who()}interrupted by a second Ctrl-C; {interrupted}", 130)
    except Stopped as e:  # args: the signal, and what was kept if the program says
        code = say(f"{prog}: {who()}stopped by {signal.Signals(e.args[0]).name}; {(e.args[1:] or (interrupted,))[0]}",
                   128 + e.args[0])
    finally:
        distributed.close()
        for child in multiprocessing.active_children():  # data-loading workers ignore SIGTERM (quiet_worker),
            child.kill()  # so multiprocessing's exit, which sends them SIGTERM and waits, would wait forever
            child.join()
    if code:  # outside the except blocks: the failed frames, and the workers' iterators, are freed first
        sys.exit(code)


def who():
    """Under torchrun, the process that speaks: "rank 3: ", or "rank 3 (stage 1): " in a pipeline."""
    several = int(os.environ.get("WORLD_SIZE", 1)) > 1 and "RANK" in os.environ
    return f"rank {os.environ['RANK']}{STAGE}: " if several else ""


def say(message, code):
    print(message, file=sys.stderr, flush=True)
    return code


def one_line(e):
    """The message of an error, without the worker traceback that DataLoader wraps around it."""
    line = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    head, sep, rest = line.partition(": ")
    return rest if sep and head.endswith("Error") else line


def peer_failure(e):
    """Whether an error is a collective that failed because another process failed, stalled or vanished: raised
    inside torch.distributed (gloo's messages vary: "Timed out", "Connection closed by peer", "Application
    timeout caused pair closure", ...)."""
    frames = traceback.extract_tb(e.__traceback__)
    inside = any(f"torch{os.sep}distributed{os.sep}" in frame.filename for frame in frames)
    return isinstance(e, dist.DistError) or inside or any(s in str(e) for s in ("gloo", "NCCL", "Timed out"))


# ---------------------------------------------------------------- progress

class Ticker:
    """A progress line (rank 0) at most every `every` seconds and at the end: what, done/total, rate, ETA.
    `extra` may be a function, called only when a line is printed (it may wait for the GPU)."""

    def __init__(self, what, total, unit="batches", every=30.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.t0 = self.last = time.time()

    def __call__(self, done, extra=""):
        now = time.time()
        if distributed.rank() or (now - self.last < self.every and done < self.total):
            return
        self.last, rate = now, done / max(now - self.t0, 1e-9)
        extra = extra() if callable(extra) else extra
        print(f"{self.what}: {done}/{self.total} {self.unit} | {rate:.3g} {self.unit}/s | "
              f"ETA {clock((self.total - done) / max(rate, 1e-9))}{' | ' + extra if extra else ''}", flush=True)


def clock(seconds):
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m{int(seconds % 60):02d}s"


# ---------------------------------------------------------------- the training loop's plumbing (train.py)

def fetch(batches):
    """The next batch, or the error that fetching it raised (a corrupt image, a data-loading worker that died)."""
    try:
        return next(batches), None
    except Exception as e:  # noqa: BLE001 (any failure must first be agreed on, so that rank 0 can save)
        return None, e


class Progress:
    """The progress line and log.jsonl entry (rank 0) after the first step, every --print-freq steps and at least
    every 30 s, with images/s and the ETA; and the NaN check of the losses since the last line. Every process
    records its own blocks' losses (pipeline.py: a stage's) and takes part in each line, which rank 0 calls `due`."""

    def __init__(self, epoch, first, steps, epochs, args, path):
        self.epoch, self.first, self.steps, self.epochs, self.args, self.path = epoch, first, steps, epochs, args, path
        self.t0 = self.shown = time.time()
        self.window = []  # (step, losses) since the last line

    def due(self, i):
        """Whether step i's line is due (rank 0's clock decides; distributed.agree tells the others)."""
        if distributed.rank() or i < self.first:
            return False
        return not (i + 1) % self.args.print_freq or i + 1 == self.steps or i == self.first or \
            time.time() - self.shown >= 30

    def record(self, i, block_losses):
        self.window.append((i, block_losses))

    def flush(self, i):
        """The losses of the latest step up to i, NaN for a block whose loss was not finite at some step since the
        last line (None if there is none); the window keeps the later steps."""
        mine = [(j, v) for j, v in self.window if j <= i]
        if not mine:
            return None
        self.window = [(j, v) for j, v in self.window if j > i]
        values = torch.stack([v for _, v in mine]).cpu()  # one wait for the device per line
        return torch.where(torch.isfinite(values).all(0), values[-1], float("nan"))

    def show(self, i, block_losses, lr, trained, log, printed=True):
        """Stop (one line) if a loss is not finite, before anything is saved; else the line for step i."""
        bad = (~torch.isfinite(block_losses)).nonzero()
        if len(bad):
            kept = f"{self.path} holds the last good state" if os.path.exists(self.path) else \
                "no checkpoint was written"
            raise Abort(f"loss of block {trained[bad[0].item()] + 1} is not finite by epoch {self.epoch + 1} "
                        f"step {i + 1}; stopped, {kept}")
        if not printed or i < self.first:  # a stop before this epoch's first step: nothing to show
            return
        self.shown, rate = time.time(), (i + 1 - self.first) * self.args.batch_size / (time.time() - self.t0)
        entry = dict(epoch=self.epoch, step=i + 1, lr=lr, loss=block_losses.tolist(), img_per_s=rate,
                     blocks=[k + 1 for k in trained], time=round(time.time(), 3))
        log(**entry)
        left = ((self.epochs - self.epoch - 1) * self.steps + self.steps - i - 1) * self.args.batch_size
        if distributed.rank() == 0:
            print(f"epoch {self.epoch + 1}/{self.epochs} step {i + 1}/{self.steps} | lr {lr:.4g} | loss per block "
                  f"{' '.join(f'{v:.4g}' for v in entry['loss'])} | {rate:.1f} img/s | ETA {clock(left / rate)}",
                  flush=True)


def report_stop(step, failure, failed_elsewhere, epoch, path):
    """After every process agreed to stop and rank 0 saved: a stop signal ends the run with exit 0; a failure with
    one line in the process that failed, and one in the others."""
    where = f"saved {path} at epoch {epoch + 1} step {step}; rerun to resume"
    if failure is not None:
        cause = one_line(failure)
        if worker_died(failure):
            cause = (f"a data-loading worker died ({cause[:160]}): out of memory, or a /dev/shm too small for "
                     "--workers x the batch; try fewer --workers or a larger /dev/shm")
        if cause.startswith("unreadable image"):  # removing the file would make the rerun another dataset
            where = where.replace("rerun to resume", "replace the file with a readable copy of the image, "
                                  "then rerun to resume (a deleted file makes it another dataset, not resumed)")
        raise Abort(f"{cause}; {where}")
    if failed_elsewhere:
        raise Abort(f"stopped: another process failed (see its line); {where}")
    if distributed.rank() == 0:
        why = signal.Signals(STOP[0]).name if STOP else "another process was signalled"
        print(f"{why}: {where}", flush=True)
