"""The command line of train.py, probe.py and bench.py: flags checked as they are parsed, one-line errors, what
the signals do, and progress lines. Nothing here is the method."""
import argparse
import multiprocessing
import os
import signal
import sys
import time
import traceback

import torch.distributed as dist

import distributed
from blockwise import parse_blocks


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

def run(main, argv, prog, interrupted="the last checkpoint.pth is kept"):
    """Entry point of train.py, probe.py and bench.py: bad input and failed runs end with one line on stderr and
    exit code 2; under torchrun every failing rank says so, naming itself, and the other ranks stop too."""
    who = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", 1)) > 1 and "RANK" in os.environ else ""
    code = 0
    try:
        main(argv)
    except (Abort, ValueError, OSError) as e:
        code = say(f"{prog}: error: {who}{one_line(e)}", 2)
    except RuntimeError as e:
        if not peer_failure(e):
            raise  # a bug: keep its traceback
        code = say(f"{prog}: error: {who}stopped: another process failed or did not answer within --timeout "
                   f"({one_line(e)[:200]})", 2)
    except KeyboardInterrupt:
        code = say(f"{prog}: {who}interrupted by a second Ctrl-C; {interrupted}", 130)
    except Stopped as e:  # args: the signal, and what was kept if the program says
        code = say(f"{prog}: {who}stopped by {signal.Signals(e.args[0]).name}; {(e.args[1:] or (interrupted,))[0]}",
                   128 + e.args[0])
    finally:
        distributed.close()
        for child in multiprocessing.active_children():  # data-loading workers ignore SIGTERM (quiet_worker),
            child.kill()  # so multiprocessing's exit, which sends them SIGTERM and waits, would wait forever
            child.join()
    if code:  # outside the except blocks: the failed frames, and the workers' iterators, are freed first
        sys.exit(code)


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
