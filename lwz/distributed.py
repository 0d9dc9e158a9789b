"""torch.distributed plumbing: init from the torchrun environment, FSDP2 wrapping, gathers.

A plain `python lwz/train.py` (no torchrun) runs as a world of one, on the same code path.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto") -> Dist:
    """Join (or create) the process group. nccl on GPUs, gloo on CPU, unless `backend` says."""
    if "RANK" not in os.environ:  # launched without torchrun: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        from lwz.config import ConfigError
        raise ConfigError("distributed.backend = 'nccl' needs CUDA GPUs and torch sees none on this machine; "
                          "use 'gloo' or 'auto'")
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                device_id=device if backend == "nccl" else None)
    return Dist(rank, world, local_rank, device, backend)


def die_with_launcher(poll_s: float = 1.0) -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID set), exit when the launcher dies, even by SIGKILL: torch
    starts its workers in their own session, so nothing else stops them, and they would keep
    training and writing into a run folder that a resume may already be using. The launcher is this
    process's parent; on Linux the kernel sends SIGKILL when it dies (prctl PR_SET_PDEATHSIG), and a
    daemon thread watching os.getppid() does the same anywhere within `poll_s`. Safe at any point:
    checkpoints and HF exports are written under *.tmp and renamed. A plain `python lwz/train.py`
    (no launcher) is left alone."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the watchdog below still covers it

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        try:
            print(f"rank {os.environ.get('RANK', '?')}: the launcher (pid {parent}) is gone; exiting",
                  file=sys.stderr, flush=True)
        finally:
            os._exit(1)

    if parent == 1:  # already orphaned before we looked
        os._exit(1)
    threading.Thread(target=watch, name="lwz-launcher-watchdog", daemon=True).start()


class PeerFailed(RuntimeError):
    """A start-up check failed on another rank, which reports it; this rank exits quietly."""


def agree_on_errors(fn, d: Dist, errors: tuple[type[BaseException], ...]):
    """Run fn() on every rank and return its result, unless it raises one of `errors` on any rank:
    then the lowest failing rank re-raises its own exception and every other rank raises
    PeerFailed, so a check that fails the same way everywhere is reported once, not once per rank.
    Collective (every rank must call it); the other ranks' messages travel with the gather."""
    err, out = None, None
    try:
        out = fn()
    except errors as e:
        err = e
    msgs = all_gather_objects(None if err is None else str(err), d.world)
    failed = [r for r, m in enumerate(msgs) if m is not None]
    if not failed:
        return out
    first = failed[0]
    if d.rank == first:
        raise err
    raise PeerFailed(msgs[first] if first == 0 else f"rank {first}: {msgs[first]}")


def report_error(line: str, show: bool = True) -> None:
    """A failing worker's one line: on stderr (when `show`) and, under torchrun, into the error file
    the launcher quotes (TORCHELASTIC_ERROR_FILE): its failure report then reads
    `traceback : <line>` instead of a link to the docs."""
    if show:
        print(line, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
        try:
            with open(path, "w") as f:
                json.dump(data, f)
        except OSError:
            pass


def shutdown_distributed(sync: bool = True, exit_code: int | None = None) -> None:
    """Destroy the process group (if any). sync: first a barrier, so that no rank tears the group down
    while a peer still has an asynchronous collective in flight (FSDP's reduce-scatters; gloo's pair
    threads). Pass sync=False on an error path, where the other ranks may never arrive.

    exit_code: then leave the process at once with that code (streams flushed, interpreter teardown
    skipped). A multi-process CPU run (gloo + FSDP2) now and then aborts in that teardown, after its
    work is done ("terminate called without an active exception"), which turns a finished run into
    a failed one; every file a run writes is closed by then (metrics rows, checkpoints, exports)."""
    if dist.is_initialized():
        if sync and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    if exit_code is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


def shard_model(model: torch.nn.Module, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None,
                reshard_after_forward: bool = True, mesh=None, layers=None) -> torch.nn.Module:
    """FSDP2: `fully_shard` every decoder block, then the root (embeddings, final norm, lm head).

    `mesh`: a 1-D DeviceMesh of the ranks that share the model (default: all ranks). `layers`: the
    decoder blocks (default `model.layers`; a reward model passes `model.model.layers`). Works on a
    model still on the meta device (then `to_empty` allocates only each rank's shard).

    FSDP2 averages gradients over ranks. Our losses are already normalised by the global
    token/sequence counts of the whole mini-batch, so the trainer multiplies each rank's loss by the
    world size before backward (gloo cannot run the PREMUL_SUM that a divide factor of 1 needs)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = dict(mp_policy=mp, reshard_after_forward=reshard_after_forward, mesh=mesh)
    for block in (model.layers if layers is None else layers):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def subgroup_mesh(ranks: list[int], device: torch.device):
    """A 1-D DeviceMesh over `ranks` (sorted). Every rank must call this (creating a process group
    is collective); ranks outside get None."""
    from torch.distributed.device_mesh import DeviceMesh

    ranks = sorted(ranks)
    group = dist.new_group(ranks) if len(ranks) < dist.get_world_size() else dist.group.WORLD
    if dist.get_rank() not in ranks:
        return None
    return DeviceMesh.from_group(group, device.type)


def set_grad_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch of a mini-batch."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def all_gather_objects(obj, world: int) -> list:
    """Every rank's `obj`, in rank order (pickled; meant for token lists and small metadata)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def all_gather_tensors(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every rank's 1-D tensor `t` (lengths may differ; same dtype and device on every rank), in rank
    order. Sizes first, then one padded all-gather of the data on t's device (nccl on GPUs, gloo on
    CPU); no pickling."""
    if world == 1:
        return [t]
    n = torch.tensor([t.numel()], dtype=torch.int64, device=t.device)
    sizes = torch.empty(world, dtype=torch.int64, device=t.device)
    _gather_single(sizes, n)
    sizes = sizes.tolist()
    m = max(sizes)
    buf = t.new_empty(m)
    buf[:t.numel()] = t
    out = t.new_empty(world * m)
    _gather_single(out, buf)
    return [out[r * m:r * m + k] for r, k in enumerate(sizes)]


# all_gather_single is the newer name of all_gather_into_tensor (which torch 2.14 deprecates)
_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a list of floats over ranks (fp64 so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def full_state_dict(model: torch.nn.Module) -> dict:
    """Full (unsharded) CPU state dict of an FSDP2 or plain model: on rank 0 only (other ranks get
    an empty dict, so the full model is never held on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---- TP / DP / HSDP groups --------------------------------------------------------------------------

@dataclass
class Groups:
    """How the ranks are arranged, built once per run (build_groups).

    Generation: consecutive ranks form TP groups of `tp` ranks inside a node (rank = dp_rank * tp +
    tp_rank); the dp = world / tp TP groups split the step's prompts. Training: FSDP2 over
    `fsdp_mesh`: None = all ranks (plain FSDP), or a 2-D mesh (nodes, ranks per node) for HSDP
    (shard inside a node, replicate across nodes)."""
    tp: int = 1
    tp_rank: int = 0
    tp_group: object = None  # the torch ProcessGroup of this rank's TP group (None when tp == 1)
    dp: int = 1
    dp_rank: int = 0
    fsdp_mesh: object = None


def local_world_size(world: int) -> int:
    """Processes per node: torchrun's LOCAL_WORLD_SIZE (the whole world when launched without it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


def check_tp(tp: int, world: int, local_world: int, heads: int, kv_heads: int, intermediate: int) -> None:
    """ConfigError (one line) unless `tp` ranks per TP group fit the node, the world and the model:
    tp divides the node's processes, the world size, the attention heads and the MLP width, and the
    KV heads (or, with fewer KV heads than tp, is a multiple of them: each KV head is then
    replicated on tp / kv_heads ranks)."""
    from lwz.config import ConfigError
    if tp == 1:
        return
    what = f"rollout.tp_size = {tp}"
    if local_world % tp:
        raise ConfigError(f"{what} must divide the processes per node (LOCAL_WORLD_SIZE = {local_world}): "
                          f"a TP group lives inside one node")
    if world % tp:
        raise ConfigError(f"{what} must divide the world size {world}")
    if heads % tp:
        raise ConfigError(f"{what} must divide the model's attention heads ({heads})")
    if kv_heads % tp and tp % kv_heads:
        raise ConfigError(f"{what} must divide the model's {kv_heads} KV heads or be a multiple of them "
                          f"(then each KV head is replicated on tp_size / {kv_heads} ranks)")
    if intermediate % tp:
        raise ConfigError(f"{what} must divide the model's MLP width (intermediate_size = {intermediate})")


def build_groups(d: Dist, tp: int = 1, hsdp: bool = False) -> Groups:
    """The run's TP groups and FSDP mesh (collective: every rank calls it, once). Expects the sizes
    check_tp accepts. hsdp: a 2-D mesh (nodes, LOCAL_WORLD_SIZE) when there are several nodes (the
    world a multiple of LOCAL_WORLD_SIZE)."""
    g = Groups(tp=tp, tp_rank=d.rank % tp, dp=d.world // tp, dp_rank=d.rank // tp)
    if tp > 1:
        for k in range(d.world // tp):  # creating a group is collective: all of them, on every rank
            grp = dist.new_group(list(range(k * tp, (k + 1) * tp)))
            if k == g.dp_rank:
                g.tp_group = grp
    L = local_world_size(d.world)
    if hsdp and d.world > L:  # (the trainer's start-up checks refuse a world that is not nodes x L)
        from torch.distributed.device_mesh import init_device_mesh
        g.fsdp_mesh = init_device_mesh(d.device.type, (d.world // L, L), mesh_dim_names=("replicate", "shard"))
    return g
