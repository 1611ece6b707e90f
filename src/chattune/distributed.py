"""Several processes, one run: who this process is, the process group, and what crosses between ranks.

`torchrun` and `accelerate launch` start one process per GPU and set RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; `train.run` reads them with `read_world`. Without them the run is one
process and nothing here calls a collective. Every rank builds the same micro-batch plan (it is a pure
function of the data and the seed) and takes its share of each optimizer step with `share_window`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from chattune.errors import ChattuneError, ConfigError

T = TypeVar("T")

# Rank 0 evaluates and writes files alone while the other ranks wait in their next collective; NCCL's
# default 10-minute timeout would kill a run whose evaluation generates for longer than that.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, evaluates, logs and writes files."""
        return self.rank == 0


def read_world(env: Mapping[str, str] = os.environ) -> World:
    """This process's place, from the launcher's environment variables (one process when they are unset)."""
    values = {}
    for key, default in [("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)]:
        raw = env.get(key)
        try:
            values[key] = default if raw in (None, "") else int(raw)
        except ValueError:
            raise ChattuneError(f"environment variable {key}={raw!r} is not an integer") from None
    world = World(rank=values["RANK"], size=values["WORLD_SIZE"], local_rank=values["LOCAL_RANK"])
    if world.size < 1 or not 0 <= world.rank < world.size or world.local_rank < 0:
        raise ChattuneError(
            f"RANK={world.rank}, WORLD_SIZE={world.size}, LOCAL_RANK={world.local_rank} do not describe "
            "a process group; start several processes with torchrun or accelerate launch"
        )
    return world


def check_launch(env: Mapping[str, str], distributed: str) -> None:
    """Refuse engine choices made in `accelerate config` that chattune would otherwise silently ignore."""
    if _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        raise ConfigError(
            "train.distributed",
            "accelerate launch is configured for DeepSpeed, which chattune does not drive; shard the model "
            "with train.distributed: fsdp (what ZeRO-3 does) and run `accelerate config` without DeepSpeed",
        )
    if _true(env.get("ACCELERATE_USE_FSDP")) and distributed != "fsdp":
        raise ConfigError(
            "train.distributed",
            f"accelerate launch is configured for FSDP but this is '{distributed}'; set "
            "train.distributed: fsdp (chattune shards the model itself; accelerate's fsdp_* settings are not read)",
        )


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def share_window(window: Sequence[T], world: World) -> list[T]:
    """This rank's micro-batches of one optimizer step: every `size`-th, starting at its rank.

    The step's micro-batches are the same as on one device, so the global batch does not change with
    the number of processes; a step with fewer micro-batches than ranks leaves some ranks without one.
    """
    return list(window[world.rank :: world.size])


# -- collectives (every rank calls each of these at the same point) ----------------------------------------
def init_process_group(world: World, device: str) -> bool:
    """Join the launcher's process group (NCCL on CUDA, gloo on CPU); False when there was nothing to do."""
    import torch
    import torch.distributed as dist

    if world.size == 1 or dist.is_initialized():
        return False
    if device == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ChattuneError(
                f"LOCAL_RANK {world.local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                "start at most one process per GPU"
            )
        torch.cuda.set_device(world.local_rank)  # "cuda" now means this rank's GPU everywhere
    # On GPUs, host tensors (FSDP's model before sharding) still need gloo: one group, both backends.
    backend = "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    # Every rank has checked config and data by now: after this barrier, rank 0 may create the run directory.
    dist.barrier()
    return True


def end_process_group(created: bool) -> None:
    """Wait until rank 0 has written everything, then leave the group we joined."""
    import torch.distributed as dist

    if created:
        dist.barrier()
        dist.destroy_process_group()


def sum_tensor_(t):
    """Sum a device tensor over ranks, in place."""
    import torch.distributed as dist

    dist.all_reduce(t)
    return t


def broadcast_trainable(params: list) -> None:
    """Rank 0's initial LoRA weights on every rank: replicas must start equal to stay equal."""
    import torch.distributed as dist

    for p in params:
        dist.broadcast(p.data, src=0)


class Replicas:
    """`train.distributed: ddp`: a whole model per rank, gradients summed by torch's DDP during the backward.

    DDP puts the trainable parameters in ~25 MiB buckets and all-reduces each bucket as soon as the
    backward has produced its gradients, so the reduction of the last layers' LoRA gradients runs while
    the first layers are still back-propagating (issue 14: with one all-reduce after the backward, 2
    GPUs ran 1.86x one). DDP can only do that for a forward it ran itself, so the loss is computed
    through it: `loss(batch)` is `loss_fn(model, batch)` under DDP. Gradients are SUMMED (a comm hook
    without DDP's division by the world size), since each rank's loss is already divided by the step's
    global target count. `micro_batch(last)` skips the reduction for all but a rank's last micro-batch
    of a step (`no_sync`): gradients accumulate locally and cross ranks once.
    """

    def __init__(self, model, loss_fn, world: World, device: str) -> None:
        import inspect

        import torch
        from torch.nn.parallel import DistributedDataParallel

        class _Loss(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, batch: dict):
                return loss_fn(self.model, batch)

        # DDP's graph splitting for torch.compile targets a compiled *whole* model; our compiled layers
        # each end their backward on their own, which is the granularity DDP's buckets overlap at. Left
        # on, it would cut every layer's graph at bucket edges (other graphs than one process compiles,
        # so a compile cache warmed by one GPU would miss).
        torch._dynamo.config.optimize_ddp = False
        # Buffers (RoPE's inverse frequencies) are computed identically on every rank: no broadcast per
        # forward. torch 2.13 renamed the argument.
        quiet = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers"
        )
        self.ddp = DistributedDataParallel(
            _Loss(),
            device_ids=[world.local_rank] if device == "cuda" else None,
            init_sync=False,  # the frozen weights were loaded alike; `broadcast_trainable` did the rest
            gradient_as_bucket_view=True,  # gradients live in the buckets: no second copy of them
            **{quiet: False},
        )
        self.ddp.register_comm_hook(None, _sum_hook)

    def loss(self, batch: dict):
        return self.ddp(batch)

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.ddp.no_sync()


def _sum_hook(_state, bucket):
    """DDP comm hook: a plain all-reduce SUM of the bucket (DDP's default divides by the world size)."""
    import torch.distributed as dist

    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class Shards:
    """`train.distributed: fsdp`: FSDP2 over the decoder layers; see `shard_model`.

    `micro_batch(last)`: gradients are reduce-scattered once per step, in the backward of a rank's last
    micro-batch; with `keep_gathered`, a layer's whole weights also stay gathered from one micro-batch
    to the next of the same step, and are freed after the last one's backward.
    """

    def __init__(self, root, keep_gathered: bool) -> None:
        self.root, self.keep_gathered = root, keep_gathered

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        self.root.set_requires_gradient_sync(last)
        if self.keep_gathered:
            self.root.set_reshard_after_backward(last)
        return contextlib.nullcontext()


def keep_gathered_fits(hf_model, device: str) -> bool:
    """`train.fsdp_reshard_after_forward: auto`: keep whole layers from forward to backward when the
    whole model's weights take at most a quarter of the GPU's memory (the rest is for activations)."""
    import torch

    if device != "cuda":
        return False
    weight_bytes = sum(p.numel() * p.element_size() for p in hf_model.parameters())
    return weight_bytes <= torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 4


def shard_model(hf_model, layers: list, device: str, size: int, reshard_after_forward: bool = True) -> Shards:
    """FSDP2: each decoder layer is one unit, the backbone's remainder (embeddings, final norm) another.

    LoRA weights live inside the layers and are sharded with them. Gradients are SUMMED over ranks
    (divide factor 1), since each rank's loss is already divided by the step's global target count.
    The output head stays a plain replicated module: the loss calls the backbone and reads the head's
    weight directly, so FSDP's forward hooks on an outer unit would never run. (With tied embeddings
    the head keeps an unsharded copy of the embedding matrix.)

    Each layer prefetches the next one's all-gather (forward) and the previous one's (backward), issued
    from the host one layer early. `reshard_after_forward=False` keeps each layer's gathered weights
    until its backward: one all-gather per layer per micro-batch instead of two (the backward needs the
    frozen weights too, for the input gradient), at the cost of holding the whole model's weights at
    the end of the forward.
    """
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        FSDPModule = None
    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise ConfigError(
            "train.distributed", f"fsdp needs FSDP2 from a newer torch than {torch.__version__}; use ddp"
        )
    mesh = init_device_mesh(device, (size,))
    backbone = hf_model.base_model
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(backbone, mesh=mesh)
    for unit in [*layers, backbone]:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo rejects PREMUL_SUM
    for i, layer in enumerate(layers):
        if i + 1 < len(layers):
            layer.set_modules_to_forward_prefetch([layers[i + 1]])
        if i > 0 and reshard_after_forward:
            layer.set_modules_to_backward_prefetch([layers[i - 1]])
    hf_model.get_output_embeddings().to(device)  # sharded units were moved by FSDP; the head was not
    # transformers' generate() reads this marker and keeps sharded ranks stepping together (synced_gpus).
    hf_model._is_fsdp_managed_module = True
    return Shards(backbone, keep_gathered=not reshard_after_forward)


def full_tensor(t):
    """A sharded (DTensor) value gathered whole on every rank; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_trainable(model) -> dict:
    """{name: whole CPU tensor} of the trainable (LoRA) weights, gathered from their shards on every rank."""
    return {n: full_tensor(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}


# -- chattune train --gpus N -----------------------------------------------------------------------------
# torchrun's own rendezvous stores (static, c10d) listen on every interface, unauthenticated, for the
# whole run, whatever --master_addr says: TCPStore binds the wildcard address. `chattune train --gpus N`
# runs torchrun with this rendezvous instead, registered through torchrun's public handler registry: one
# machine, its store on a socket we bind to 127.0.0.1 and hand to TCPStore (`master_listen_fd`). The
# workers use that store (`use_agent_store`), and gloo / NCCL are told to use the loopback interface.
LOOPBACK_RDZV = "chattune-loopback"


class LoopbackRendezvous:
    """torchrun's rendezvous for the one node of a single-machine run, its store on 127.0.0.1 only.

    Implements torch.distributed.elastic.rendezvous.RendezvousHandler (subclassed at registration, so
    that importing this module stays free of torch).
    """

    def __init__(self, run_id: str, timeout_s: int = 600) -> None:
        self.run_id, self.timeout_s = run_id, timeout_s
        self._store = None
        self._socket: socket.socket | None = None
        self._closed = False

    def get_backend(self) -> str:
        return LOOPBACK_RDZV

    @property
    def use_agent_store(self) -> bool:
        return True  # workers connect to this store instead of rank 0 opening another one

    def next_rendezvous(self):
        from torch.distributed import PrefixStore, TCPStore
        from torch.distributed.elastic.rendezvous.api import RendezvousInfo, RendezvousStoreInfo

        if self._store is None:
            self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._socket.bind(("127.0.0.1", 0))  # port 0: the kernel picks a free one, no race
            self._socket.listen(128)
            port = self._socket.getsockname()[1]
            self._store = TCPStore(
                "127.0.0.1",
                port,
                1,  # one node: this agent
                True,
                timedelta(seconds=self.timeout_s),
                multi_tenant=True,
                master_listen_fd=self._socket.fileno(),
            )
        port = self._socket.getsockname()[1]
        store = PrefixStore(self.run_id, self._store)
        return RendezvousInfo(store, 0, 1, RendezvousStoreInfo("127.0.0.1", port))

    def is_closed(self) -> bool:
        return self._closed

    def set_closed(self) -> None:
        self._closed = True

    def num_nodes_waiting(self) -> int:
        return 0

    def get_run_id(self) -> str:
        return self.run_id

    def shutdown(self) -> bool:
        return True


def run_torchrun(args: list[str]) -> None:
    """torchrun's own main with the loopback rendezvous registered (`python -m chattune.distributed ...`)."""
    from torch.distributed.elastic.rendezvous import RendezvousHandler
    from torch.distributed.elastic.rendezvous.registry import handler_registry
    from torch.distributed.run import main

    handler = type("LoopbackRendezvousHandler", (LoopbackRendezvous, RendezvousHandler), {})
    handler_registry.register(LOOPBACK_RDZV, lambda params: handler(params.run_id))
    main(args)


def torchrun_command(nproc: int, argv: list[str], module: str = "chattune.cli") -> list[str]:
    """torchrun running `python -m <module> <argv>` in `nproc` processes of this machine, on loopback only."""
    return [
        sys.executable,
        "-m",
        "chattune.distributed",  # torchrun with LoopbackRendezvous
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        f"--rdzv-backend={LOOPBACK_RDZV}",
        "--rdzv-endpoint=127.0.0.1",  # where the store is (the handler binds it); torchrun wants one named
        "-m",
        module,
        *argv,
    ]


def loopback_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment for torchrun's workers: gloo and NCCL bootstrap sockets on the loopback interface
    (they otherwise listen on the host's address); a value the user set is kept."""
    return {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo", **env}


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `chattune <argv>` under torchrun with `nproc` processes; returns torchrun's exit code."""
    import subprocess

    import torch

    if nproc < 1:
        raise ChattuneError(f"--gpus must be at least 1, got {nproc}")
    if os.environ.get("WORLD_SIZE"):
        raise ChattuneError(
            "--gpus inside a torchrun/accelerate launch: drop --gpus, the launcher starts the processes"
        )
    have = torch.cuda.device_count()
    if 0 < have < nproc:
        raise ChattuneError(f"--gpus {nproc}: only {have} GPU(s) visible (CUDA_VISIBLE_DEVICES)")
    if have == 0:
        print(f"no CUDA GPU: running {nproc} CPU processes (gloo)", file=sys.stderr, flush=True)
    return subprocess.call(torchrun_command(nproc, argv), env=loopback_env())


if __name__ == "__main__":
    run_torchrun(sys.argv[1:])
