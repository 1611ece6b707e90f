"""Checkpoints written beside the steps: a host copy taken at the step boundary, written by one thread.

`HostCopies.take(tree)` copies every tensor of a nested dict / list / tuple to host memory, so the next
step, which changes the live weights and Adam moments in place, cannot change what is written. CUDA
tensors go into one pinned buffer (non-blocking copies, then one synchronize), CPU tensors into one plain
buffer; both are kept and reused by the next checkpoint of the same layout. Each copy is a tensor of its
own (its own storage within the buffer, `torch.frombuffer`), so torch.save and safetensors write each as
they would the live one; entries that are the same memory (tied weights) stay one tensor.
`BackgroundWriter` runs one write at a time in a thread; `wait` returns once it is on disk and raises
ChattuneError naming the folder when it failed (`files.atomic_path` has removed its temporary folder).

Written here rather than with `torch.distributed.checkpoint.async_save`: that writes DCP's own folder
format (shards + metadata), not the adapter folder every chattune command reads, and stages every tensor
on every rank, where only rank 0 writes here.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Callable
from pathlib import Path

from chattune.console import say
from chattune.errors import ChattuneError

_ALIGN = 64  # bytes: every copy starts on a cache line (and on any dtype's element size)


def _alias_key(t) -> tuple:
    """Two tensors with this key are the same memory seen the same way (a tied weight under two names)."""
    return (
        str(t.device),
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
    )


def _tensors(tree, found: dict) -> None:
    """Every tensor of `tree` (dicts, lists, tuples) into `found` by `_alias_key`, in walk order."""
    import torch

    if isinstance(tree, torch.Tensor):
        found.setdefault(_alias_key(tree), tree)
    elif isinstance(tree, dict):
        for v in tree.values():
            _tensors(v, found)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _tensors(v, found)


def _rebuild(tree, copies: dict):
    """`tree` with every tensor replaced by its host copy and every other leaf deep-copied (plain dicts)."""
    import torch

    if isinstance(tree, torch.Tensor):
        return copies[_alias_key(tree)]
    if isinstance(tree, dict):
        return {k: _rebuild(v, copies) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_rebuild(v, copies) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_rebuild(v, copies) for v in tree)
    return copy.deepcopy(tree)


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class HostCopies:
    """Host copies of a checkpoint's tensors in buffers kept from one checkpoint to the next."""

    def __init__(self) -> None:
        self._raw: dict = {}  # pinned (bool) -> uint8 buffer, kept while large enough
        self._carved: dict = {}  # pinned -> (layout, views): reused while shapes and dtypes stay
        self._reserving: threading.Thread | None = None

    def reserve(self, nbytes: int, *, pinned: bool = True) -> None:
        """Allocate the buffer of `nbytes` in a background thread now, so that the first `take` finds it
        (pinning a few GB of host memory takes a good part of a second). Nothing when `nbytes` is 0."""
        if nbytes <= 0:
            return

        def work() -> None:
            import torch

            try:
                self._raw[pinned] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
            except Exception:  # e.g. too little host memory to pin: `take` allocates, and says why
                pass

        self._reserving = threading.Thread(target=work, name="chattune-checkpoint-buffer", daemon=True)
        self._reserving.start()

    def take(self, tree):
        """A copy of `tree` whose tensors live in host memory owned here, consistent as of this call.

        Returns once every copy has landed (one `torch.cuda.synchronize` for CUDA tensors). The copies are
        overwritten by the next `take`: the caller writes them before it calls again.
        """
        import torch

        found: dict = {}
        _tensors(tree, found)
        groups: dict[bool, list] = {True: [], False: []}  # pinned (from CUDA) or plain
        for key, t in found.items():
            groups[t.is_cuda].append((key, t))
        copies: dict = {}
        for pinned, items in groups.items():
            if not items:
                continue
            views = self._views(pinned, [t for _, t in items])
            for (key, t), view in zip(items, views, strict=True):
                view.copy_(t.detach(), non_blocking=pinned)
                copies[key] = view
        if groups[True]:
            torch.cuda.synchronize()
        return _rebuild(tree, copies)

    def _views(self, pinned: bool, tensors: list) -> list:
        """One host tensor per entry of `tensors` (same shape and dtype, contiguous), within one buffer."""
        import torch

        if self._reserving is not None:
            self._reserving.join()
            self._reserving = None
        layout = tuple((t.dtype, tuple(t.shape)) for t in tensors)
        carved = self._carved.get(pinned)
        if carved is not None and carved[0] == layout:
            return carved[1]
        offsets, total = [], 0
        for t in tensors:
            offsets.append(total)
            total += _padded(t.numel() * t.element_size())
        raw = self._raw.get(pinned)
        if raw is None or raw.numel() < total:
            self._raw.pop(pinned, None), self._carved.pop(pinned, None)  # freed before the new one
            raw = self._raw[pinned] = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=pinned)
        array = raw.numpy()  # the views keep it (and `raw`) alive for as long as they live
        views = [
            torch.frombuffer(array, dtype=t.dtype, count=t.numel(), offset=off).view(t.shape)
            if t.numel()
            else torch.empty(t.shape, dtype=t.dtype)
            for t, off in zip(tensors, offsets, strict=True)
        ]
        self._carved[pinned] = (layout, views)
        return views


def pinned_bytes(model, optimizer) -> int:
    """A checkpoint's CUDA tensors in bytes (as `take` lays them out): the trainable weights, and AdamW's
    two moments of each weight the optimizer keeps on the GPU (memory mode keeps them on the host).
    An estimate for `HostCopies.reserve`: `take` allocates again when it is short."""
    weights = sum(_padded(p.nbytes) for p in model.parameters() if p.requires_grad and p.is_cuda)
    moments = sum(2 * _padded(p.nbytes) for g in optimizer.param_groups for p in g["params"] if p.is_cuda)
    return weights + moments


class BackgroundWriter:
    """One write at a time in a background thread; its failure is raised by the next `wait`."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._folder: Path | None = None
        self.written = 0  # writes finished
        self.write_s = 0.0  # seconds the writes took, in the thread
        self.blocked_s = 0.0  # seconds the steps waited for checkpoints (added by the Checkpointer)

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def start(self, folder: Path, write: Callable[[], None]) -> None:
        """Run `write()` (which writes `folder`) in a thread. Call `wait` first: one write at a time."""
        if self._thread is not None:
            raise RuntimeError("a checkpoint is still being written: wait() for it first")

        def work() -> None:
            t0 = time.perf_counter()
            try:
                write()
            except BaseException as e:  # reported by wait(), in the thread that trains
                self._error = e
            self.write_s += time.perf_counter() - t0

        self._folder, self._error = folder, None
        # Not a daemon: a process that ends while a checkpoint is being written finishes writing it.
        self._thread = threading.Thread(target=work, name=f"chattune-checkpoint-{folder.name}")
        self._thread.start()

    def wait(self, *, quiet: bool = False) -> None:
        """Return once the write in flight (if any) is on disk.

        Raises ChattuneError naming the folder when it failed (nothing of that folder was left behind);
        `quiet` (the run stops for another reason already): says so instead.
        """
        thread, folder = self._thread, self._folder
        if thread is None:
            return
        t0 = time.perf_counter()
        try:
            thread.join()
        finally:
            self.blocked_s += time.perf_counter() - t0
        self._thread, error, self._error = None, self._error, None
        if error is None:
            self.written += 1
            return
        why = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        failed = ChattuneError(
            f"checkpoint {folder} could not be written ({why}); nothing of it was kept and the checkpoints "
            f"before it are as they were. Free disk space or make {folder.parent} writable; --resume "
            "continues from the last complete checkpoint"
        )
        if not quiet:
            raise failed from error
        say(f"warning: {failed}")

    @contextlib.contextmanager
    def writing(self):
        """Around the steps: leaving, wait for the write in flight, and say what writing cost. Leaving
        with an error, a failed write is said, not raised over that error."""
        try:
            yield
        except BaseException:
            self.wait(quiet=True)
            raise
        self.wait()
        if self.written:
            say(
                f"checkpoints: {self.written} written beside the steps in {self.write_s:.1f}s; "
                f"the steps waited {self.blocked_s:.2f}s for them"
            )


def adapter_tensors(model) -> dict:
    """The entries of `model.state_dict()` that peft's `save_pretrained` writes (each adapter's, and the
    embeddings it saves with them), under their state_dict names: given as `state_dict`, the same file.

    peft picks them (its own rules: LoRA, DoRA, modules_to_save, resized embeddings); only their live
    tensors are matched back to their names here. Nothing is copied.
    """
    import warnings

    from peft import get_peft_model_state_dict

    live = model.state_dict()
    chosen: set = set()
    with warnings.catch_warnings():  # peft says its notes when it writes, in the thread
        warnings.simplefilter("ignore")
        for name in model.peft_config:
            picked = get_peft_model_state_dict(model, state_dict=live, adapter_name=name)
            chosen.update(_alias_key(t) for t in picked.values())
    return {k: v for k, v in live.items() if _alias_key(v) in chosen}
