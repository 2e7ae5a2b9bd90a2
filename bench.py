"""Speed and memory of one training step, three schedules side by side (nothing here is a test).

    python bench.py                                   # ResNet-50, 224 px, batch 8, projector 2048-2048-2048, CPU
    python bench.py --batch-size 256 --projector 8192-8192-8192 --json bench.json   # paper sizes, one GPU

Schedules: e2e = one Barlow Twins head on top of the whole ResNet (the baseline); released = the
authors' order (every block forward for both views, then the backward passes); ours = train.py's
step (block k back-propagated before block k+1 runs). Each configuration runs in a fresh process so
that its peak memory is its own: on GPU torch.cuda.max_memory_allocated; on CPU the peak RSS over two
steps (the first creates LARS's momentum; nothing runs before them) of a second fresh process run with
MALLOC_MMAP_THRESHOLD_=65536, so that glibc hands freed tensors back to the OS and the RSS follows the
live memory (with the default allocator, freed activations stay resident and the peak overstates the
step; the setting slows the step, so it is not used for timing). "above torch" subtracts the RSS of the
process after importing torch and torchvision, before any tensor: like max_memory_allocated on a GPU,
it counts tensors only.
FLOPs come from torch.utils.flop_counter (forward + backward, per image, both views counted), in an eager step
before the warm-up: the model's FLOPs, on which MFU is computed, and those run, with recomputation. The warm-up
steps (compilation included) come before the peak-memory reset and the timed steps. MFU's yardstick is this
device's dense matmul rate in the step's precision: bf16, or fp32 as train.py runs it (TF32 on GPUs).
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import augment
import bookkeeping
import data
import distributed
import losses
import pipeline
import recompute
import train
import vit
from blockwise import ARCHS, POOLINGS
from cli import COUNT, POSITIVE_INT, Abort, Parser, run, widths

# name: (schedule, options); options: bf16, channels_last, recompute (heads/all), compile
CONFIGS = {
    "e2e fp32": ("e2e", {}),
    "released fp32": ("released", {}),
    "ours fp32": ("ours", {}),
    "ours fp32 compile": ("ours", {"compile": True}),
    "ours fp32 ckpt-head": ("ours", {"recompute": "heads"}),
    "ours fp32 ckpt-all": ("ours", {"recompute": "all"}),
    "ours fp32 channels-last": ("ours", {"channels_last": True}),
    "e2e bf16": ("e2e", {"bf16": True}),
    "released bf16": ("released", {"bf16": True}),
    "ours bf16": ("ours", {"bf16": True}),
    "ours bf16 channels-last": ("ours", {"bf16": True, "channels_last": True}),
    "ours bf16 ckpt-head": ("ours", {"bf16": True, "recompute": "heads"}),
    "ours bf16 compile": ("ours", {"bf16": True, "compile": True}),
}

DEFAULT_CPU = ["e2e fp32", "released fp32", "ours fp32", "ours fp32 compile", "ours fp32 ckpt-head",
               "ours fp32 ckpt-all"]


def get_args(argv=None):
    p = Parser(__doc__)
    a = p.add_argument
    a("--arch", default="resnet50", choices=ARCHS + tuple(vit.VITS))
    a("--patch-size", type=POSITIVE_INT, default=16, help="ViT patch size")
    a("--image-size", type=POSITIVE_INT, default=224)
    a("--batch-size", type=POSITIVE_INT, default=8, help="images per view per step")
    a("--projector", default="2048-2048-2048", type=widths)
    a("--pooling", default="cbe", choices=tuple(dict.fromkeys(POOLINGS + vit.POOLINGS)))
    a("--head-dim", type=POSITIVE_INT, default=2048)
    a("--loop", action="store_true", help="time the whole training loop instead (train.py: data loading, workers, "
      "two-view augmentation, step), with the CPU pipeline and with --gpu-aug, beside the step alone and each "
      "pipeline's work alone")
    a("--dataset", default="fake", choices=data.DATASETS, help="--loop: a dataset of train.py (fake = generated "
      "500x375 JPEGs)")
    a("--data", default="./data", help="--loop: its root")
    a("--workers", type=COUNT, default=min(8, os.cpu_count()), help="--loop: data-loading processes")
    a("--loop-steps", type=POSITIVE_INT, default=20, help="--loop: steps timed, after 3 warm-up steps")
    a("--steps", type=POSITIVE_INT, default=3, help="timed steps after two warm-up steps")
    a("--configs", default="", help=f"'all' or a comma list from: {', '.join(CONFIGS)}. Default on GPU: all; "
      f"on CPU (about 7 minutes here): {', '.join(DEFAULT_CPU)}: bf16 has no fast CPU kernels without "
      "AVX512-BF16/AMX, and channels-last did not win here. --loop: the one configuration whose flags train.py "
      "gets (default: ours bf16 compile on GPU, ours fp32 compile on CPU)")
    a("--layouts", action="store_true", help="blocks on separate devices (pipeline.py): each block's cost, the "
      "best split into 2 stages, then train.py's loop, one thread per process, in one process, 2 data-parallel "
      "processes and 2 pipeline stages: images/s, each process's peak memory and where a stage's time goes "
      "(--dataset, --data, --loop-steps as --loop)")
    a("--traffic", default="", help="no timing: the bytes each process sends per step for these numbers of "
      "processes (e.g. 8,32) at the model's sizes, by collective, and what all-gathering the projector outputs "
      "instead of all-reducing Barlow Twins' d x d matrix would send (ring algorithms)")
    a("--json", default="", help="write the results here")
    a("--worker", default="", help=argparse.SUPPRESS)
    a("--worker-memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = list(CONFIGS) if args.configs == "all" else [c for c in args.configs.split(",") if c]
    if any(n not in CONFIGS for n in names):
        p.error(f"argument --configs: unknown {next(n for n in names if n not in CONFIGS)!r}; choose from "
                f"{', '.join(CONFIGS)}")
    return args


def setup(args, schedule, opt):
    """Model, optimizer, two random views and the step function of one configuration."""
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    distributed.configure(device)  # cuDNN autotuning and TF32, as train.py
    config = dict(arch=args.arch, blocks="1234" if schedule == "e2e" else "1,2,3,4", pooling=args.pooling,
                  head_dim=args.head_dim, noise=0.0 if schedule == "e2e" else 0.25,
                  projector_widths=[int(w) for w in args.projector.split("-")])
    config.update(dict(image_size=args.image_size, patch_size=args.patch_size) if args.arch in vit.VITS else {})
    model = bookkeeping.network(config, 0).to(device).train()
    if opt.get("recompute"):
        recompute.apply(model, opt["recompute"])
    fmt = torch.channels_last if opt.get("channels_last") else torch.contiguous_format
    model.to(memory_format=fmt)
    y1, y2 = (torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device).to(memory_format=fmt)
              for _ in range(2))
    bf16, loss_fns = opt.get("bf16", False), [lambda z1, z2, y: losses.barlow_twins(z1, z2)] * len(model.blocks)
    optimizer = train.LARS(model.parameters(), lr=0.1)
    owners = train.grad_owners(model, list(range(len(model.blocks))))
    block_loss = train.head_losses(model, loss_fns)

    def released():  # the authors' order: all forwards, then one backward per block (Algorithm 1)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            f1, f2 = model(y1), model(y2)
            zs = [(model.projectors[k](a), model.projectors[k](b)) for k, (a, b) in enumerate(zip(f1, f2))]
        for z1, z2 in zs:
            losses.barlow_twins(z1, z2).backward()

    def step():
        optimizer.zero_grad(set_to_none=True)
        if schedule == "released":
            released()
        else:  # e2e is train.py's step with a single block
            train.train_step(model, y1, y2, None, block_loss, owners, bf16)
        optimizer.step()
    return model, step, device


def rss_mib(field):
    """This process's resident memory (Linux): VmRSS now or VmHWM, its peak. Not getrusage's ru_maxrss,
    which Linux carries over fork + exec: a child would report at least its parent's size."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def worker(args, name):
    schedule, opt = CONFIGS[name]
    runtime = rss_mib("VmRSS")  # torch + torchvision imported, no model yet
    model, step, device = setup(args, schedule, opt)
    if args.worker_memory:  # CPU: the two steps measured come first (a FLOP count's step would set the peak)
        if opt.get("compile"):
            recompute.compile_heads(model)
        step()  # the first creates LARS's momentum
        step()
        return dict(peak_mib=rss_mib("VmHWM"), runtime_mib=runtime)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    flops = dict(run=count_flops(step))  # eager, before compiling: FlopCounterMode does not see inside compiled code
    if opt.get("recompute"):  # MFU counts the model's FLOPs, not the recomputed ones
        recompute.apply(model, "none")
        flops["model"] = count_flops(step)
        recompute.apply(model, opt["recompute"])
    if opt.get("compile"):
        recompute.compile_heads(model)
    t0 = time.perf_counter()
    for _ in range(2):  # warm-up: compilation, cuDNN's autotuning, LARS's momentum
        step()
    sync()
    warmup = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]  # the median step: one slow step (another process, a page-in) does not count
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_mib("VmHWM")
    return dict(config=name, sec_per_step=sec, img_per_s=args.batch_size / sec,
                gflop_per_img=flops.get("model", flops["run"]) / args.batch_size / 1e9,
                executed_gflop_per_img=flops["run"] / args.batch_size / 1e9,
                peak_mib=peak, runtime_mib=0, warmup_s=warmup, device=device.type)


def count_flops(step):
    with FlopCounterMode(display=False) as fc:
        step()
    return fc.get_total_flops()


def matmul_peak(dtype, seconds=1.0):
    """This device's dense matmul FLOP/s in `dtype` (fp32 as train.py computes it: TF32 on GPUs), the best over
    square sizes 512 to 8192, each timed over about a second of back-to-back products with one synchronisation
    at the end; sizes stop growing once one product takes a quarter of that. The yardstick of the MFU column."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    best = 0.0
    for n in (512, 1024, 2048, 4096, 8192):
        if best and 2 * n ** 3 / best > seconds / 4:
            break
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        sync()
        t0, reps = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            for _ in range(10):
                a @ b
            reps += 10
            if device == "cpu" or reps % 100 == 0:
                sync()
        sync()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


def worker_argv(args, name):
    """The command line of the process that measures configuration `name` with these sizes."""
    return [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("json", "worker", "configs", "worker_memory", "loop", "layouts", "traffic")] + \
        ["--worker", name]


def measure(args, name):
    """Time one configuration in a fresh process; on CPU measure its memory in another."""
    argv = worker_argv(args, name)
    runs = [([], {})]
    if not torch.cuda.is_available():
        runs.append((["--worker-memory"], {"MALLOC_MMAP_THRESHOLD_": "65536"}))
    row = {}
    for extra, env in runs:
        r = subprocess.run([sys.executable, __file__, *argv, *extra], capture_output=True, text=True,
                           env={**os.environ, **env})
        if r.returncode:
            print(f"{name}: failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}",
                  flush=True)
            return None
        row.update(json.loads(r.stdout.strip().splitlines()[-1]))
    return row


def main(args):
    if args.worker:
        return print(json.dumps(worker(args, args.worker)))
    if args.loop:
        return loop(args)
    if args.layouts:
        return layouts(args)
    if args.traffic:
        return traffic(args, [int(w) for w in args.traffic.split(",")])
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    rows, cuda, failed = [], torch.cuda.is_available(), []
    names = (list(CONFIGS) if args.configs == "all" else args.configs.split(",")) if args.configs else \
        (list(CONFIGS) if cuda else DEFAULT_CPU)
    for name in names:
        row = measure(args, name)
        if row is None:
            failed.append(name)
            continue
        row["mfu"] = row["gflop_per_img"] * 1e9 * row["img_per_s"] / peaks["bf16" if "bf16" in name else "fp32"]
        rows.append(row)
        print(f"{name:26s} {row['sec_per_step']:7.2f} s/step {row['img_per_s']:7.2f} img/s "
              f"{row['gflop_per_img']:6.1f} GFLOP/img ({row['executed_gflop_per_img']:6.1f} run) "
              f"{row['mfu'] * 100:5.1f}% MFU {row['peak_mib']:8.0f} MiB peak "
              f"{row['peak_mib'] - row['runtime_mib']:8.0f} MiB above torch", flush=True)
    base = {r["config"]: r for r in rows}
    print(f"\nmachine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}; matmul peak "
          f"{peaks['fp32'] / 1e9:.0f} GFLOP/s fp32, {peaks['bf16'] / 1e9:.0f} GFLOP/s bf16")
    print(f"{args.arch} {args.image_size}px batch {args.batch_size} (x2 views) projector {args.projector} "
          f"pooling {args.pooling}")
    for a, b in (("ours fp32", "released fp32"), ("ours fp32 compile", "released fp32"),
                 ("ours fp32 compile", "ours fp32"),
                 ("ours fp32 ckpt-head", "released fp32"),
                 ("ours fp32 ckpt-all", "released fp32"), ("ours bf16", "ours fp32"),
                 ("ours bf16", "released bf16"), ("released fp32", "e2e fp32")):
        if a in base and b in base:
            above = [base[c]["peak_mib"] - base[c]["runtime_mib"] for c in (a, b)]
            print(f"{a} / {b}: speed x{base[a]['img_per_s'] / base[b]['img_per_s']:.2f}, peak memory "
                  f"x{base[a]['peak_mib'] / base[b]['peak_mib']:.2f}" +
                  (f" (above the torch runtime: x{above[0] / above[1]:.2f})" if base[a]["runtime_mib"] else "") +
                  f", FLOPs x{base[a]['gflop_per_img'] / base[b]['gflop_per_img']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), matmul_peak=peaks, rows=rows, env=bookkeeping.environment()), f, indent=1)
    if failed:
        raise Abort(f"{len(failed)} configuration(s) failed: {', '.join(failed)}")


def two_views(args, on_device):
    """train.py's augmented training set, with either pipeline."""
    return data.Seeded(data.dataset(args.dataset, args.data), augment.TwoViews(args.image_size, on_device=on_device))


def augmentation_rate(args, on_device=False, images=64):
    """Two views of one image per call, in this process on one core: images/s per core. on_device: only what
    the workers do under --gpu-aug (decode, crop, draw the choices)."""
    torch.set_num_threads(1)
    ds = two_views(args, on_device)
    ds[0]
    t0 = time.perf_counter()
    for i in range(1, images + 1):
        ds[i % len(ds)]
    return images / (time.perf_counter() - t0)


def device_augmentation_rate(args, reps=5):
    """--gpu-aug's share on the device (`augment.augment` + normalisation of both views of a batch): images/s."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.set_num_threads(os.cpu_count())
    ds = two_views(args, on_device=True)
    views, _ = torch.utils.data.default_collate([ds[i % len(ds)] for i in range(args.batch_size)])
    views = [(crops.to(device), choices) for crops, choices in views]
    for _ in range(2):  # warm-up, then timed
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            for crops, choices in views:
                augment.normalize(augment.augment(crops, choices))
        sync()
    return reps * args.batch_size / (time.perf_counter() - t0)


def train_flags(name):
    """train.py's flags for the step configuration `name` of CONFIGS."""
    opt = CONFIGS[name][1]
    return (["--bf16"] * opt.get("bf16", False) + ["--channels-last"] * opt.get("channels_last", False)
            + ["--recompute", opt.get("recompute", "none"), "--compile" if opt.get("compile") else "--no-compile"])


def loop_rate(args, extra, warm=3):
    """train.py itself for warm + --loop-steps steps: images/s over the steps after the warm-up."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "train.py", "--dataset", args.dataset, "--data", args.data, "--arch", args.arch,
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--projector",
               args.projector, "--head-dim", str(args.head_dim), "--pooling", args.pooling, "--workers",
               str(args.workers), "--epochs", "1", "--warmup-epochs", "0", "--print-freq", "1", "--monitor-every",
               "0", "--limit", str((warm + args.loop_steps) * args.batch_size), "--out", out, *extra]
        if not torch.cuda.is_available():
            cmd += ["--device", "cpu"]
        r = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True)
        if r.returncode:
            raise Abort(f"the loop failed: {r.stderr.strip().splitlines()[-1]}")
        t = [e["time"] for e in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "time" in e]
    return (len(t) - warm) * args.batch_size / (t[-1] - t[warm - 1])


def loop(args):
    """The loop a user runs against what it is made of: is the data pipeline the limit? Both pipelines."""
    name = args.configs or ("ours bf16 compile" if torch.cuda.is_available() else "ours fp32 compile")
    if args.dataset == "fake":  # as many generated images as the timed steps take, in an image folder
        args = argparse.Namespace(**{**vars(args), "dataset": "folder",
                                     "data": data.fake_root(args.data, (3 + args.loop_steps) * args.batch_size)})
    r = dict(config=name, aug_per_core=augmentation_rate(args), crop_per_core=augmentation_rate(args, True),
             device_aug=device_augmentation_rate(args))
    torch.set_num_threads(os.cpu_count())
    step = measure(args, name)
    if step is None:
        raise Abort(f"the step alone ({name}) failed")
    r["step"] = step["img_per_s"]
    r["loop"], r["loop_gpu_aug"] = (loop_rate(args, train_flags(name) + x) for x in ([], ["--gpu-aug"]))
    print(f"step ({name}) alone: {r['step']:.1f} images/s; {args.image_size} px, {args.dataset}, "
          f"{args.workers} workers")
    print(f"CPU augmentation: {r['aug_per_core']:.1f} images/s per core, so the step needs "
          f"{r['step'] / r['aug_per_core']:.1f} cores; train.py's loop: {r['loop']:.1f} images/s = "
          f"{r['loop'] / r['step']:.2f} x the step")
    print(f"--gpu-aug: workers {r['crop_per_core']:.1f} images/s per core, so the step needs "
          f"{r['step'] / r['crop_per_core']:.1f} cores; the device's share {r['device_aug']:.1f} images/s "
          f"({100 * r['step'] / r['device_aug']:.0f} % of a step's time); train.py's loop: {r['loop_gpu_aug']:.1f} "
          f"images/s = {r['loop_gpu_aug'] / r['step']:.2f} x the step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), **r, env=bookkeeping.environment()), f, indent=1)


# ---------------------------------------------------------------- blocks on separate devices (pipeline.py)

def block_costs(args, reps=3):
    """Each block's forward + backward seconds and FLOPs (pipeline.block_costs) in this process on one thread,
    at the batch one process of 2 would hold."""
    torch.set_num_threads(1)
    model, _, _ = setup(argparse.Namespace(**{**vars(args), "batch_size": args.batch_size // 2}), "ours", {})
    y = torch.randn(args.batch_size // 2, 3, args.image_size, args.image_size)
    block_loss = train.head_losses(model, [lambda z1, z2, y: losses.barlow_twins(z1, z2)] * len(model.blocks))
    return pipeline.block_costs(model, block_loss, y, reps)


def layout_run(args, name, nproc, extra):
    """train.py's loop in `nproc` processes of one thread: images/s after the warm-up, each process's peak RSS
    (VmHWM, MiB) and its stdout (pipeline.py's time lines)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = ["train.py", "--dataset", args.dataset, "--data", args.data, "--arch", args.arch, "--image-size",
               str(args.image_size), "--batch-size", str(args.batch_size), "--projector", args.projector,
               "--head-dim", str(args.head_dim), "--workers", "0", "--epochs", "1", "--warmup-epochs", "0",
               "--print-freq", "1", "--monitor-every", "0", "--no-compile", "--device", "cpu", "--limit",
               str((3 + args.loop_steps) * args.batch_size), "--out", out, *extra]
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
            if nproc > 1 else [sys.executable]
        p = subprocess.Popen(launch + cmd, cwd=os.path.dirname(os.path.abspath(__file__)), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
        peaks = {}
        while p.poll() is None:
            for pid, rank in workers(out):
                with contextlib.suppress(OSError, StopIteration):
                    line = next(x for x in open(f"/proc/{pid}/status") if x.startswith("VmHWM"))
                    peaks[rank] = max(peaks.get(rank, 0), int(line.split()[1]) / 1024)
            time.sleep(0.2)
        stdout, stderr = p.communicate()
        if p.returncode:
            raise Abort(f"{name} failed: {stderr.strip().splitlines()[-1]}")
        t = [e["time"] for e in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "time" in e]
    return dict(layout=name, img_per_s=(len(t) - 3) * args.batch_size / (t[-1] - t[2]),
                peak_mib=[peaks[r] for r in sorted(peaks)], times=[x for x in stdout.splitlines() if "waiting" in x])


def workers(marker):
    """(pid, rank) of the train.py processes whose command line holds `marker`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            if marker.encode() in cmd and b"distributed.run" not in cmd:
                pairs = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                env = dict(v.split(b"=", 1) for v in pairs if b"=" in v)
                yield int(pid), int(env.get(b"RANK", b"0"))


def layouts(args):
    """Blocks on separate devices against data parallelism on this machine (README, docs/performance.md)."""
    seconds, flops = block_costs(args)
    split = pipeline.best_split(seconds, 2)
    stages = ",".join("".join(str(k + 1) for k in s) for s in split)
    cost = [sum(seconds[k] for k in s) for s in split]
    for k, (s, f) in enumerate(zip(seconds, flops)):
        print(f"block {k + 1}: {s * 1000:7.1f} ms forward + backward (both views, {args.batch_size // 2} images), "
              f"{f / 1e9:6.2f} GFLOP", flush=True)
    print(f"best 2-stage split --stages {stages}: stage costs {' '.join(f'{c * 1000:.0f}' for c in cost)} ms, "
          f"max/mean {max(cost) / (sum(cost) / 2):.2f}", flush=True)
    model = setup(args, "ours", {})[0]
    state = [sum(p.numel() * 4 * 3 for k in s for m in model.block_modules(k) for p in m.parameters()) / 2 ** 20
             for s in split]  # fp32 weights, gradients, LARS momentum of each stage
    runtime = float(subprocess.run([sys.executable, "-c", "import train; print(next(x for x in open("
                                    "'/proc/self/status') if x.startswith('VmHWM')).split()[1])"],
                                   cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                                   text=True).stdout) / 1024  # the process before any tensor
    rows = [layout_run(args, "1 process, 1 thread", 1, []),
            layout_run(args, "2 data-parallel processes", 2, []),
            layout_run(args, f"2 pipeline stages (--stages {stages})", 2, ["--stages", stages])]
    print(f"peak RSS per process, as weights + gradients + LARS momentum / the rest above the {runtime:.0f} MiB "
          "of an idle train.py process (activations, the data, the allocator):")
    for r, held in zip(rows, ([sum(state)], [sum(state)] * 2, state)):
        r["state_mib"], r["runtime_mib"] = held, runtime
        print(f"{r['layout']:42s} {r['img_per_s']:7.1f} img/s  " + ", ".join(
            f"{m:.0f} MiB = {s:.0f} / {m - runtime - s:.0f}" for m, s in zip(r["peak_mib"], held)), flush=True)
        for line in r["times"]:
            print("    " + line)
    dp, pipe, one = rows[1]["img_per_s"], rows[2]["img_per_s"], rows[0]["img_per_s"]
    print(f"pipeline / data parallel: x{pipe / dp:.2f}; pipeline / one process: x{pipe / one:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), seconds=seconds, flops=flops, split=stages, rows=rows,
                           env=bookkeeping.environment()), f, indent=1)



def traffic(args, worlds):
    """Bytes sent per process and step, ring algorithms: an all-reduce of S bytes sends 2 (W - 1) / W x S, an
    all-gather or a reduce-scatter of S bytes in all (W - 1) / W x S. Per block and view the losses all-reduce
    Eq. (1)'s d x d matrix and, standardising, 2 x d; each is all-reduced again in the backward. BatchNorm
    (distributed.SyncBatchNorm) all-reduces 3 x C float64 per layer and view, forward and backward; the
    gradients once. The alternative: all-gather both views' projector outputs (B x d each) and reduce-scatter
    their gradients."""
    config = dict(arch=args.arch, pooling=args.pooling, head_dim=args.head_dim,
                  projector_widths=[int(w) for w in args.projector.split("-")])
    config.update(dict(image_size=args.image_size, patch_size=args.patch_size) if args.arch in vit.VITS else {})
    with torch.device("meta"):
        model = bookkeeping.network(config, 0)
    d, n, b = config["projector_widths"][-1], len(model.blocks), args.batch_size
    grads = 4 * sum(p.numel() for p in model.parameters())
    bn = 2 * 2 * 8 * 3 * sum(m.num_features for m in model.modules()
                             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    matrix = 2 * n * 4 * (d * d + 2 * 2 * d)  # forward and backward, per block: C, and both views' mean and var
    gather = 2 * n * 4 * 2 * b * d  # both views' outputs gathered, their gradients reduce-scattered
    print(f"{args.arch}, projector {args.projector}, batch {b}: {grads / 1e9:.2f} GB of gradients; "
          f"GB sent per process and step", flush=True)
    print(f"{'processes':>9} {'gradients':>9} {'BatchNorm':>9} {'losses: d x d all-reduce':>24} "
          f"{'losses: all-gather':>18}")
    for w in worlds:
        ring = (w - 1) / w
        print(f"{w:>9} {2 * ring * grads / 1e9:>9.2f} {2 * ring * bn / 1e9:>9.3f} {2 * ring * matrix / 1e9:>24.2f} "
              f"{ring * gather / 1e9:>18.2f}")


if __name__ == "__main__":
    run(main, get_args(), "bench.py")
