"""Several processes, one run: who this process is, the process group, and what crosses between ranks.

`torchrun` and `accelerate launch` start one process per GPU and set RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; `train.run` reads them with `read_world`. Without them the run is one
process and nothing here calls a collective. Every rank builds the same micro-batch plan (it is a pure
function of the data and the seed) and takes its share of each optimizer step with `share_window`;
how the step's gradients then cross ranks (DDP's replicas or FSDP2's shards) is `strategies`.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from chattune.console import say
from chattune.errors import ChattuneError, ConfigError

T = TypeVar("T")

# Rank 0 evaluates and writes files alone while the other ranks wait in their next collective; NCCL's
# default 10-minute timeout would kill a run whose evaluation generates for longer than that.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class World:
    """This process's place in the launch, and the device it computes on (`cuda` is this rank's GPU)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # set once by `train.job.run` (`model.load.pick_device`); travels with the world

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
    """Refuse strategy choices made in `accelerate config` that chattune would otherwise silently ignore."""
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
def init_process_group(world: World) -> bool:
    """Join the launcher's process group (NCCL on CUDA, gloo on CPU); False when there was nothing to do."""
    device = world.device
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
    """torchrun's own main with the loopback rendezvous registered (`python -m chattune.train.world ...`)."""
    from torch.distributed.elastic.rendezvous import RendezvousHandler
    from torch.distributed.elastic.rendezvous.registry import handler_registry
    from torch.distributed.run import main

    handler = type("LoopbackRendezvousHandler", (LoopbackRendezvous, RendezvousHandler), {})
    handler_registry.register(LOOPBACK_RDZV, lambda params: handler(params.run_id))
    main(args)


def torchrun_command(nproc: int, argv: list[str], module: str = "chattune") -> list[str]:
    """torchrun running `python -m <module> <argv>` in `nproc` processes of this machine, on loopback only."""
    return [
        sys.executable,
        "-m",
        "chattune.train.world",  # torchrun with LoopbackRendezvous
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
        say(f"no CUDA GPU: running {nproc} CPU processes (gloo)")
    return subprocess.call(torchrun_command(nproc, argv), env=loopback_env())


if __name__ == "__main__":
    run_torchrun(sys.argv[1:])
