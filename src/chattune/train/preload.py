"""The base model loads while the data reads and renders (issue 28, item 3: less around the training).

`train.job.run` calls `start_base_load` right after the run's checks and before `read_and_render`:
the two do not need each other until `build_model` (on one H200 the 7B legal job's data line took
13.3 s and the model line came 8.8 s after it, one after the other). In one process the load runs in a
background thread; under torchrun each rank's GPU is only chosen when the process group starts
(`world.init_process_group`), so there it loads after that, as before (`BaseLoad.result` loads then).

What the load decides from the config (the attention kernel, memory mode, compilation) is decided here,
in the calling thread, together with everything that touches process-wide state (the compile cache and
its worker pool, the libraries' verbosity), so that the thread only reads files into the device. The
torch generator is seeded by the caller before the thread starts and nothing else draws from it until
the thread is joined, so LoRA's initial weights are those of a run that loads in line.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

from chattune.config.schema import Config
from chattune.model.load import load_model, pick_dtype
from chattune.model.lora import training_model_config
from chattune.train import decide
from chattune.train.compiling import start_compile_workers, use_compile_cache
from chattune.train.world import World


@dataclasses.dataclass
class LoadedBase:
    """The base model as loaded (no LoRA yet) and the decisions its loading took."""

    model: object  # transformers PreTrainedModel on the device (or the host, `sharded`)
    attn: str  # attention implementation
    offload: bool  # memory mode, on a GPU
    quantized: bool  # model.quantization is on (bitsandbytes)
    use_compile: bool  # the decoder layers will be compiled


class BaseLoad:
    """One base model's loading, in a background thread (`background`) or when its result is asked for.

    `result()` returns the `LoadedBase` (joining the thread) and re-raises whatever the loading raised
    (ModelError for a model that cannot load), in the caller's thread. `settle()` waits for a running
    load without raising: `run` calls it when the data stage fails first, so the process never exits
    while a thread is still copying weights into the GPU.
    """

    def __init__(self, load, background: bool) -> None:
        self._load, self._value, self._error = load, None, None
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, name="chattune-model-load", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._load()
        except BaseException as e:  # handed to the caller's thread by result()
            self._error = e

    def result(self) -> LoadedBase:
        if self._thread is None:
            self._run()
        else:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value

    def settle(self) -> None:
        if self._thread is not None:
            self._thread.join()


def start_base_load(cfg: Config, model_dir: Path, world: World, sharded: bool) -> BaseLoad:
    """Decide how the base model loads and start loading it (`world.device` already picked).

    `sharded`: read in the device's dtype onto the host (FSDP then moves each rank's shard). In one
    process the load starts now in a thread; with several it runs at `result()`, after the process
    group has started.
    """
    from chattune.model.attention import pick_attn_implementation, register_attention

    device, tc = world.device, cfg.train
    if not world.is_main:  # the libraries' progress bars and notices: rank 0 shows them once
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    register_attention()
    attn = cfg.model.attn_implementation
    if attn == "auto":
        attn = pick_attn_implementation(device, tc.packing)
    offload = tc.offload and device == "cuda"  # on the CPU everything is in host memory already
    quantized = cfg.model.quantization != "none"
    use_compile = decide.use_compile(tc, device, quantized)
    if use_compile:  # the compile workers start while the model loads
        use_compile_cache()
        start_compile_workers()
    if sharded:
        dtype = str(pick_dtype(cfg.model.dtype, device)).removeprefix("torch.")
        model_cfg, target = dataclasses.replace(cfg.model, dtype=dtype), "cpu"
    else:  # full fine-tuning: fp32 master weights (methods.training_model_config says why)
        model_cfg, target = training_model_config(cfg.model, cfg.lora, offload), device

    def load() -> LoadedBase:
        model = load_model(model_dir, model_cfg, target, attn_implementation=attn)
        return LoadedBase(model, attn, offload, quantized, use_compile)

    return BaseLoad(load, background=world.size == 1)
