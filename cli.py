"""What train.py and probe.py share that is not the method: one-line errors, argparse, processes, progress."""
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

import losses


class Abort(Exception):
    """A bad input or a failed run, reported as one line without a traceback."""


STOP = []  # set by SIGTERM: save at the end of the current step and exit


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the usage of ~35 flags would bury the message)."""

    def __init__(self, doc):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def setup_distributed():
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without it we are one process. NCCL on GPUs, gloo on CPU."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return device, (dist.get_rank() if dist.is_initialized() else 0), losses.world_size()


def one_line(e):
    """The message of an error, without the worker traceback that DataLoader wraps around it."""
    line = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return line.split(": ", 1)[1] if line.split(":")[0].endswith("Error") else line


def run(main, argv, prog):
    """Entry point of train.py and probe.py: bad input and failed runs end with one line on stderr
    (from rank 0 only) and exit code 2."""
    try:
        main(argv)
    except (Abort, ValueError, OSError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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
