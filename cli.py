"""What train.py and probe.py share that is not the method: one-line errors, argparse, processes, progress."""
import argparse
import datetime
import fcntl
import multiprocessing
import os
import signal
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist

import losses


class Abort(Exception):
    """A bad input or a failed run, reported as one line without a traceback."""


STOP = []  # set by SIGTERM or a first Ctrl-C: save at the end of the current step and exit


def stop_on_signals():
    """SIGTERM (preemption, scancel) or a first Ctrl-C: finish the step, save, exit 0. A second Ctrl-C quits."""
    def handler(signum, frame):
        if signum == signal.SIGINT and STOP:
            raise KeyboardInterrupt
        STOP.append(signum)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def quiet_worker(_):
    """DataLoader workers ignore SIGTERM and SIGINT: Slurm and Ctrl-C signal the whole process group, and a
    worker that dies first would kill the main process before it saves. Workers exit with their parent."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})  # see start_workers


def start_workers(loader):
    """iter(loader), whose workers are born with SIGTERM and SIGINT blocked, so that a signal sent while they
    start is not lost to them before quiet_worker runs; the main process gets its own copy right after."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the usage of ~35 flags would bury the message)."""

    def __init__(self, doc):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def setup_distributed(timeout_min=10.0):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without it we are one process. NCCL on GPUs, gloo on CPU.
    A collective that waits longer than `timeout_min` for another process fails (one line, see `run`)."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=datetime.timedelta(minutes=timeout_min))
    return device, (dist.get_rank() if dist.is_initialized() else 0), losses.world_size()


def one_line(e):
    """The message of an error, without the worker traceback that DataLoader wraps around it."""
    line = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    head, sep, rest = line.partition(": ")
    return rest if sep and head.endswith("Error") else line


def run(main, argv, prog):
    """Entry point of train.py and probe.py: bad input and failed runs end with one line on stderr and exit
    code 2; under torchrun every failing rank says so, naming itself, and the other ranks stop too."""
    who = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
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
        code = say(f"{prog}: {who}interrupted (a second Ctrl-C); the last checkpoint is kept", 130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for child in multiprocessing.active_children():  # data-loading workers ignore SIGTERM (quiet_worker),
            child.kill()  # so multiprocessing's exit, which sends them SIGTERM and waits, would wait forever
            child.join()
    if code:  # outside the except blocks: the failed frames, and the workers' iterators, are freed first
        sys.exit(code)


def say(message, code):
    print(message, file=sys.stderr, flush=True)
    return code


def peer_failure(e):
    """Whether an error is a collective that failed because another process failed, stalled or vanished: raised
    inside torch.distributed (gloo's messages vary: "Timed out", "Connection closed by peer", "Application
    timeout caused pair closure", ...)."""
    frames = traceback.extract_tb(e.__traceback__)
    inside = any(f"torch{os.sep}distributed{os.sep}" in frame.filename for frame in frames)
    return isinstance(e, dist.DistError) or inside or any(s in str(e) for s in ("gloo", "NCCL", "Timed out"))


class FolderLock:
    """One run per output folder: an exclusive lock on OUT/.lock, which names its holder, for the run's life."""

    def __init__(self, folder):
        self.path = os.path.join(folder, ".lock")
        self.file = open(self.path, "a+")
        try:  # a POSIX lock: not inherited by the data-loading workers that fork from this process
            fcntl.lockf(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
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


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


class Ticker:
    """A progress line (rank 0) at most every `every` seconds and at the end: what, done/total, rate, ETA."""

    def __init__(self, what, total, unit="batches", every=30.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.t0 = self.last = time.time()

    def __call__(self, done, extra=""):
        now = time.time()
        if rank() or (now - self.last < self.every and done < self.total):
            return
        self.last, rate = now, done / max(now - self.t0, 1e-9)
        print(f"{self.what}: {done}/{self.total} {self.unit} | {rate:.3g} {self.unit}/s | "
              f"ETA {clock((self.total - done) / max(rate, 1e-9))}{' | ' + extra if extra else ''}", flush=True)


def clock(seconds):
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m{int(seconds % 60):02d}s"
