"""Processes: torchrun's process group, this process's rank and device, and every collective the run issues
outside the losses (losses.py holds the autograd-aware ones of Eq. (1) and Fig. 5).

Every collective here takes its tensor on the process group's device: NCCL serves CUDA tensors only, so a
tensor made on the host is copied there and back (`_on_group_device`). Three groups share the processes:
- the default group (NCCL on GPUs, gloo on CPU): losses, SyncBatchNorm, buffers, features, counts;
- `GRADS`, a second communicator of the same backend: the per-block gradient averaging of train.py, so that
  block k's all-reduce runs beside block k+1's SyncBatchNorm and loss collectives instead of queueing behind them;
- `CONTROL`, gloo on the host: the flags that steer the loop (stop at this step, a process failed), so that
  deciding never waits for the GPU.
Written by hand, not DistributedDataParallel: DDP's contract is one forward and one backward, Algorithm 1 has
one backward per block (README, "How this differs").
"""
import datetime
import logging
import os

import torch
import torch.distributed as dist

import losses

DEVICE = torch.device("cpu")  # the default group's device, set by setup()
GRADS = CONTROL = None
DP = None  # the data-parallel group: every process (None), or one pipeline stage's replicas
FORCE = "BLOCKWISE_DISTRIBUTED"  # =1: the distributed code path in a single process (.ci/gpu runs it with NCCL)
# For tests only (.ci/gpu): =1 puts several processes on each GPU, joined by gloo (which takes CUDA tensors),
# so that one GPU runs the real cross-process BatchNorm; NCCL cannot hold two ranks on one GPU.
SHARED = "BLOCKWISE_SHARE_GPUS"


def setup(device="auto", timeout_min=10.0, needs_gpu=""):
    """Bind this process to its device and, under torchrun (or with BLOCKWISE_DISTRIBUTED=1), join the process
    group: NCCL on GPUs, gloo on CPU. `device`: auto (a GPU if one is usable), cuda or cpu. `needs_gpu` names
    what asks for a GPU (e.g. "--bf16"): with `auto` and no usable GPU that is refused rather than run on the CPU.
    A collective that waits longer than `timeout_min` for another process fails. Returns the device.
    Raises ValueError (one line) for an impossible set-up."""
    global DEVICE, GRADS, CONTROL
    world, local_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    if world > 1 and "RANK" not in os.environ:
        raise ValueError(f"WORLD_SIZE={world} but no RANK: start the processes with torchrun, which sets both")
    usable, shared = torch.cuda.is_available(), os.environ.get(SHARED) == "1"
    if device == "auto":
        wants = needs_gpu or (f"{world} processes" if world > 1 else "")
        if wants and not usable:
            raise ValueError(f"{wants} but no usable GPU (torch.cuda.is_available() is False: no GPU, or a driver "
                             "too old for this torch); pass --device cpu to run on the CPU")
        device = "cuda" if usable else "cpu"
    if device == "cuda":
        if not usable:
            raise ValueError("--device cuda: no usable GPU (torch.cuda.is_available() is False)")
        if local_rank >= torch.cuda.device_count() and not shared:
            raise ValueError(f"LOCAL_RANK {local_rank}, but this node shows {torch.cuda.device_count()} GPU(s): "
                             "--nproc_per_node must not exceed them (or pass --device cpu)")
        DEVICE = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(DEVICE)
    else:
        DEVICE = torch.device("cpu")
    configure(DEVICE)
    if world > 1 or os.environ.get(FORCE) == "1":
        timeout = datetime.timedelta(minutes=timeout_min)
        nccl = DEVICE.type == "cuda" and not shared
        try:  # the host group's first exchange right here: a wrong network interface fails now, said
            dist.init_process_group("nccl" if nccl else "gloo", device_id=DEVICE if nccl else None,
                                    timeout=timeout, **restart_safe_store(world, timeout))
            GRADS = dist.new_group(timeout=timeout)
            CONTROL = dist.new_group(backend="gloo", timeout=timeout)
            dist.all_reduce(torch.zeros(1), group=CONTROL)
        except RuntimeError as e:
            raise ValueError(f"the {world} processes could not connect ({_first_line(e)}); on several nodes, set "
                             "GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME) to the network interface the nodes "
                             "share, e.g. GLOO_SOCKET_IFNAME=eth0 (README, several nodes)") from e
    return DEVICE


def _first_line(e):  # an exception's first line, without gloo's source location
    return str(e).strip().splitlines()[0].split("] ")[-1][:200] if str(e).strip() else type(e).__name__


def configure(device):
    """Process-wide settings. GPU: cuDNN picks each convolution's fastest algorithm once (the sizes never change);
    fp32 matmuls use TF32, as cuDNN's convolutions already do. Inductor compiles with the node's cores shared among
    its processes (unless TORCHINDUCTOR_COMPILE_THREADS says otherwise): set in inductor's config, which
    read the variable when torch imported it. CPU: compile's probe for a CUDA toolkit is silenced."""
    import torch._inductor.config as inductor
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        inductor.compile_threads = max(1, os.cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def restart_safe_store(world, timeout):
    """init_process_group's store under torchrun: the agent's, with this restart's keys apart from the last one's.
    torchrun shares one store across restarts (TORCHELASTIC_USE_AGENT_STORE), so after `--max-restarts` a new
    process group read the dead processes' addresses and hung (pytorch/pytorch#135712); each restart now has its own
    prefix. Without the agent's store, env:// as usual."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dict(store=dist.PrefixStore(f"blockwise/attempt_{attempt}", store), rank=int(os.environ["RANK"]),
                world_size=world)


def active():
    """Whether this process is part of a process group (torchrun, or forced): every collective then runs."""
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if active() else 0


def world():
    return dist.get_world_size() if active() else 1


def dp_rank():  # this process's share of the global batch (pipeline.py: its replica's)
    return dist.get_rank(DP) if active() else 0


def dp_world():  # §3.4: the global batch is spread over this many processes (pipeline: replicas)
    return dist.get_world_size(DP) if active() else 1


def dp_first():  # the global rank of the data-parallel group's first process
    return dist.get_global_rank(DP, 0) if active() and DP is not None else 0


def _on_group_device(collective, t, group=None, **kw):
    """Run `collective` on `t` in place, on the group's device (the host for CONTROL), copying if need be."""
    where = torch.device("cpu") if group is not None and group is CONTROL else DEVICE
    moved = t if t.device == where else t.to(where)
    work = collective(moved, group=group, **kw)
    if moved is not t:
        if work is not None:
            work.wait()
        t.copy_(moved)
    return work


def all_reduce(t, op=dist.ReduceOp.SUM, group=None, async_op=False):
    """Sum (or `op`) of `t` over the processes, in place; async_op returns the work to wait for."""
    if not active():
        return None
    return _on_group_device(dist.all_reduce, t, group, op=op, async_op=async_op)


def broadcast(t, src=0, group=None):
    """Global rank `src`'s `t` to every process of `group` (all by default), in place."""
    if active():
        _on_group_device(dist.broadcast, t, group, src=src)


def broadcast_object(obj, src=0):
    """A picklable object from rank `src` to every process, over the host group."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src, group=CONTROL)
    return box[0]


def host_barrier():
    """Every process waits here for the others, on the host group: not inside an NCCL collective, whose
    watchdog would abort a process that waits there longer than --timeout."""
    if active():
        dist.barrier(group=CONTROL)


def gather_rows(t, n):
    """Rank r holds rows r, r + world, r + 2 world, ... of an n-row tensor; every rank gets all n rows, in order,
    on the group's device."""
    if not active():
        return t
    w, t = world(), t.to(DEVICE)
    padded = t.new_zeros(-(-n // w), *t.shape[1:])
    padded[:len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    return torch.stack(parts, 1).flatten(0, 1)[:n]


def agree(*flags):
    """Each flag OR-ed over the processes, on the host (CONTROL group): every rank takes the same decision at the
    same step. Returns a tuple of bools."""
    if not active():
        return tuple(bool(f) for f in flags)
    t = torch.tensor([float(bool(f)) for f in flags])
    all_reduce(t, dist.ReduceOp.MAX, group=CONTROL)
    return tuple(bool(v) for v in t.tolist())


def first_rank_with(flag):
    """The lowest rank whose `flag` is true, or None (CONTROL group)."""
    t = torch.tensor([float(rank() if flag else world())])
    if active():
        all_reduce(t, dist.ReduceOp.MIN, group=CONTROL)
    return None if t.item() >= world() else int(t.item())


_FLAT = {}  # per block: the flat buffer its parameters' gradients are views of (bucket_grads)


def bucket_grads(params):
    """Before a step's backward: give `params` zeroed gradients that are views of one flat buffer, kept
    from step to step. The backward accumulates into it in place, and average_grads all-reduces the
    buffer itself: no copy of the gradients in or out (DDP's gradient_as_bucket_view)."""
    if not params or not active():
        return
    key = tuple(map(id, params))
    if key not in _FLAT:
        _FLAT[key] = params[0].new_empty(sum(p.numel() for p in params))
    flat = _FLAT[key].zero_()
    for p, view in zip(params, views(flat, params)):
        p.grad = view


def average_grads(params):
    """Start averaging these gradients over the processes (GRADS group); returns a function that waits
    for it. train.py calls it per block, as DDP does per bucket, so that it overlaps the next block's
    compute. The gradients must be bucket_grads' views."""
    if not params or not active():
        return lambda: None
    flat = _FLAT[tuple(map(id, params))]
    if any(p.grad is None or p.grad._base is not flat for p in params):
        raise RuntimeError("average_grads: the gradients are not bucket_grads' views (set after it?)")
    work = all_reduce(flat, group=GRADS, async_op=True)
    return lambda: (work.wait(), flat.div_(dp_world()))


def views(flat, tensors):
    """A vector cut into views shaped as `tensors`, in order."""
    offset, out = 0, []
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def unflatten_into(flat, tensors):
    """Copy a vector back into the tensors it was concatenated from (one message instead of one each)."""
    for t, view in zip(tensors, views(flat, tensors)):
        t.copy_(view)


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of the data-parallel group (§3.4: the paper's batch of 2048 is
    spread over its GPUs): one all-reduce of each channel's count, sum and sum of squares per layer,
    on GPUs and CPUs alike, and no host synchronisation (torch's SyncBatchNorm waits for the host
    once per layer to leave out empty processes). A process may hold no image (App. A's routing).
    The backward is the all-reduce's own: the gradients of the sums, summed over the group, so that
    outputs, gradients and running statistics are those of nn.BatchNorm on the concatenated batch.
    Input (N, C, ...); in eval mode, or alone in its group, it is nn.BatchNorm."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"BatchNorm expects an (N, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x):
        if not (self.training and dp_world() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        c, dims, shape = x.shape[1], [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        n = x.numel() // c
        xf = x.float() if x.element_size() < 4 else x  # half types: statistics in float32
        # (an empty process's zeros still depend on x: its backward must all-reduce as the others do)
        var, mean = torch.var_mean(xf, dims, correction=0) if n else (xf.sum(dims),) * 2
        # float64 sums: E[x^2] - E[x]^2 without cancellation, from each process's own (mean, var)
        mean, var = mean.double(), var.double()
        count, s1, s2 = _summed(torch.stack([torch.full_like(mean, n), n * mean, n * (var + mean * mean)]))
        mean = s1 / count
        var = s2 / count - mean * mean
        if self.track_running_stats:
            self._track(mean.detach(), (var * count / (count - 1)).detach())
        scale = (var + self.eps).rsqrt()
        if self.affine:
            scale = scale * self.weight
        shift = (self.bias if self.affine else 0) - mean * scale
        return (xf * scale.to(xf.dtype).view(shape) + shift.to(xf.dtype).view(shape)).to(x.dtype)

    @torch.no_grad()
    def _track(self, mean, unbiased_var):
        self.num_batches_tracked.add_(1)
        m = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), m)


@torch.compiler.disable  # a compiled head runs the collective eagerly, between two graphs
def _summed(t):
    return losses.all_reduce(t)  # autograd-aware, over losses.GROUP = DP


def sync_batchnorm(model):
    """Every BatchNorm of `model` made a SyncBatchNorm, in place. The class adds no state, so only the
    class changes: parameters, buffers, state_dict keys and pipeline.py's meta blocks stay as they are."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.__class__ = SyncBatchNorm
    return model


def check_replicas(model):
    """After training, every rank must hold exactly rank 0's weights and BN statistics (gradients averaged
    identically, BN buffers of frozen blocks untouched); a mismatch is a bug, not noise. Returns a line to print.
    Raises ValueError naming how many ranks differ."""
    own = [t.detach().double().flatten() for t in model.state_dict().values() if not t.is_meta]
    mine = torch.cat(own)
    ref = mine.clone()
    broadcast(ref, dp_first(), DP)  # pipeline.py: each stage's replicas against their first
    bad = torch.tensor(float(not torch.equal(mine, ref)))
    all_reduce(bad)
    if bad:
        raise ValueError(f"the weights of {int(bad)} rank(s) differ from rank 0's")
    if DP is not None:  # pipeline.py
        return f"the {dp_world()} replica(s) of every stage hold identical weights"
    return f"all {world()} ranks hold identical weights"


def close():
    if active():
        dist.destroy_process_group()
