"""How the processes of a run share each optimizer step: one process, replicas (DDP) or shards (FSDP2).

`strategy_for` picks one, once, from the launch and `train.distributed`; `build_strategy` builds it around the
model. `loop.train_step` then runs every step through the same calls, whatever the choice:

    for each of this rank's micro-batches (blank ones included: see `loop.train_step`):
        with strategy.micro_batch(last):          # gradients cross ranks in the last one's backward only
            strategy.loss(batch).backward()       # the micro-batch's summed loss (through DDP for replicas)
    strategy.reduce_loss_(loss)                   # the step's loss summed over ranks, for the log
    strategy.clip_grad_norm(params, max_norm)     # the whole model's gradient norm, the same on every rank
and, to save, `strategy.trainable_state()` (shards gathered whole). `sharded` says whether the weights are
split over ranks: then every rank takes part in each forward (evaluation too) and checkpoints gather.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

from chattune.config.schema import TrainConfig
from chattune.errors import ChattuneError, ConfigError
from chattune.train.world import World, broadcast_trainable, full_tensor, gather_trainable, sum_tensor_


class Strategy(Protocol):
    """What `loop.train_step`, the checkpoints and evaluation ask of a strategy (see the module docstring)."""

    sharded: bool

    def loss(self, batch: dict): ...
    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager: ...
    def reduce_loss_(self, t): ...
    def clip_grad_norm(self, params: list, max_norm: float): ...
    def trainable_state(self) -> dict | None: ...


def strategy_for(world: World, distributed: str) -> type[OneProcess | Replicas | Shards]:
    """The strategy of this launch: one process alone, else `train.distributed` (`ddp` or `fsdp`)."""
    if world.size == 1:
        return OneProcess
    return Shards if distributed == "fsdp" else Replicas


def build_strategy(model, tc: TrainConfig, world: World, loss_of) -> Strategy:
    """The strategy `strategy_for` picks, built around `model` (the peft model, or the whole model).

    `loss_of(model, batch)`: a micro-batch's summed loss (a 0-d tensor). With several processes, rank 0's
    initial trainable weights are copied to every rank first (replicas must start equal to stay equal),
    and then each rank seeds its own generator (LoRA dropout: each rank draws its own masks).
    """
    cls = strategy_for(world, tc.distributed)
    if cls is OneProcess:
        return OneProcess(model, loss_of)
    import torch

    broadcast_trainable([p for p in model.parameters() if p.requires_grad])
    torch.manual_seed(tc.seed + world.rank)
    if cls is Shards:
        return Shards(model, loss_of, world, tc.fsdp_reshard_after_forward)
    return Replicas(model, loss_of, world)


class OneProcess:
    """One process, one device: nothing crosses, nothing is gathered."""

    sharded = False

    def __init__(self, model, loss_fn) -> None:
        self.model, self.loss_fn = model, loss_fn

    def loss(self, batch: dict):
        return self.loss_fn(self.model, batch)

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def reduce_loss_(self, t):
        return t

    def clip_grad_norm(self, params: list, max_norm: float):
        import torch

        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def trainable_state(self) -> dict | None:
        return None  # write_adapter reads the model itself


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

    sharded = False

    def __init__(self, model, loss_fn, world: World) -> None:
        device = world.device
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

    def reduce_loss_(self, t):
        return sum_tensor_(t)

    def clip_grad_norm(self, params: list, max_norm: float):
        import torch

        return torch.nn.utils.clip_grad_norm_(params, max_norm)  # the gradients are summed already

    def trainable_state(self) -> dict | None:
        return None  # every rank holds the whole model; rank 0 writes it


def _sum_hook(_state, bucket):
    """DDP comm hook: a plain all-reduce SUM of the bucket (DDP's default divides by the world size)."""
    import torch.distributed as dist

    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class Shards:
    """`train.distributed: fsdp`: FSDP2 over the decoder layers; see `shard_model`.

    `reshard_after_forward` (`train.fsdp_reshard_after_forward`): `on`, `off`, or `auto` (off when
    `keep_gathered_fits`). `micro_batch(last)`: gradients are reduce-scattered once per step, in the
    backward of a rank's last micro-batch; with the weights kept gathered, a layer's whole weights also
    stay gathered from one micro-batch to the next of the same step, and are freed after the last one's
    backward. The gradient norm and the trainable state are gathered from the shards on every rank.
    """

    sharded = True

    def __init__(self, model, loss_fn, world: World, reshard_after_forward: str) -> None:
        device = world.device
        reshard = {"on": True, "off": False}.get(reshard_after_forward)
        if reshard is None:  # auto
            reshard = not keep_gathered_fits(model.get_base_model(), device)
        self.model, self.loss_fn, self.keep_gathered = model, loss_fn, not reshard
        self.root = shard_model(
            model.get_base_model(),
            decoder_layers(model, "train.distributed: ddp"),
            device,
            world.size,
            reshard,
        )

    def loss(self, batch: dict):
        return self.loss_fn(self.model, batch)

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        self.root.set_requires_gradient_sync(last)
        if self.keep_gathered:
            self.root.set_reshard_after_backward(last)
        return contextlib.nullcontext()

    def reduce_loss_(self, t):
        return sum_tensor_(t)

    def clip_grad_norm(self, params: list, max_norm: float):
        import torch

        return full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))  # gathered on every rank

    def trainable_state(self) -> dict | None:
        return gather_trainable(self.model)  # a collective: every rank takes part


def keep_gathered_fits(hf_model, device: str) -> bool:
    """`train.fsdp_reshard_after_forward: auto`: keep whole layers from forward to backward when the
    whole model's weights take at most a quarter of the GPU's memory (the rest is for activations)."""
    import torch

    if device != "cuda":
        return False
    weight_bytes = sum(p.numel() * p.element_size() for p in hf_model.parameters())
    return weight_bytes <= torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 4


def shard_model(hf_model, layers: list, device: str, size: int, reshard_after_forward: bool = True):
    """FSDP2: each decoder layer is one unit, the backbone's remainder (embeddings, final norm) another;
    returns the backbone (the root unit, whose settings reach every unit).

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
    return backbone


def decoder_layers(model, needed_by: str = "train.compile: off") -> list:
    """The repeated transformer blocks (`model.model.layers` in Qwen2, Llama and ERNIE-4.5 models): the
    units FSDP shards and the compiler compiles. Raises ChattuneError when the model has none there,
    naming `needed_by`, the setting that does without them."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(hf, "model", None), "layers", None)
    if layers is None:
        key = needed_by.split(":")[0]
        raise ChattuneError(f"{key}: cannot find the decoder layers of {type(hf).__name__}; set {needed_by}")
    return list(layers)
