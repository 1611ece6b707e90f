"""Every rule between config keys, and the output directory rule, in one place (`config.load` calls them).

Each check returns (key, problem) pairs, so one load reports every mistake at once.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from pathlib import Path

from chattune.config.schema import MUTATING_INITS, Config, LoraConfig, TrackConfig, TrainConfig
from chattune.errors import ChattuneError, ConfigError

# -- checks that types alone cannot express; each returns a reason or None ---------------------------
_POSITIVE = {
    "data.max_len",
    "lora.r",
    "lora.alpha",
    "train.micro_batch_size",
    "train.grad_accum_steps",
    "train.logging_steps",
    "train.pack_tokens",
    "eval.max_new_tokens",
    "eval.batch_size",
}


# A LoRA rank above every hidden size ever trained is a typo: refused here, not after minutes of loading
# with a C++ allocation error. Usual ranks are 8-256; a model's own width bounds any useful one.
MAX_LORA_RANK = 16_384


def check_values(cfg: Config) -> list[tuple[str, str]]:
    bad: list[tuple[str, str]] = []
    if cfg.lora.r > MAX_LORA_RANK:
        bad.append(
            ("lora.r", f"{cfg.lora.r} is larger than any model's hidden size; use at most {MAX_LORA_RANK}")
        )
    for key in sorted(_POSITIVE):
        sec, name = key.split(".")
        if getattr(getattr(cfg, sec), name) <= 0:
            bad.append((key, "must be a positive number"))
    for key, value in [("lora.dropout", cfg.lora.dropout), ("train.warmup_ratio", cfg.train.warmup_ratio)]:
        if not 0.0 <= value < 1.0:
            bad.append((key, f"must be in [0, 1), got {value}"))
    if not 0.0 <= cfg.data.eval_ratio < 1.0:
        bad.append(("data.eval_ratio", f"must be in [0, 1), got {cfg.data.eval_ratio}"))
    if cfg.train.lr <= 0:
        bad.append(("train.lr", "must be positive"))
    if cfg.train.epochs <= 0 and cfg.train.max_steps is None:
        bad.append(("train.epochs", "must be positive (or set train.max_steps)"))
    for key, value in [
        ("train.max_steps", cfg.train.max_steps),
        ("train.save_steps", cfg.train.save_steps),
        ("train.eval_steps", cfg.train.eval_steps),
        ("data.max_samples", cfg.data.max_samples),
    ]:
        if value is not None and value <= 0:
            bad.append((key, "must be a positive integer or null"))
    if cfg.eval.samples < 0:
        bad.append(("eval.samples", "must be >= 0"))
    if cfg.train.packing and cfg.train.pack_tokens < cfg.data.max_len:
        bad.append(("train.pack_tokens", f"must be >= data.max_len ({cfg.data.max_len})"))
    if cfg.train.weight_decay < 0:
        bad.append(("train.weight_decay", f"must be >= 0, got {cfg.train.weight_decay}"))
    if cfg.train.max_grad_norm <= 0:
        bad.append(("train.max_grad_norm", f"must be positive, got {cfg.train.max_grad_norm}"))
    if cfg.eval.max_eval_examples is not None and cfg.eval.max_eval_examples <= 0:
        bad.append(("eval.max_eval_examples", "must be a positive integer or null"))
    if not 0 <= cfg.train.seed < 2**63:  # torch, numpy and `random` all take it (with the rank added)
        bad.append(("train.seed", f"must be in [0, 2**63), got {cfg.train.seed}"))
    bad += check_track(cfg.track)
    return bad


# SwanLab 0.10's own rules (swanlab/sdk/internal/pkg/constraints: ProjectName, ExperimentName,
# Description, TagString); without this check swanlab.init refuses the name after the model has loaded.
_SWANLAB_PROJECT = re.compile(r"[0-9a-zA-Z_\-+.]{1,100}")  # used with fullmatch


# track.backend name -> (module to find, the install line)
TRACKER_PACKAGES = {
    "swanlab": ("swanlab", "pip install swanlab"),
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "mlflow": ("mlflow", "pip install 'chattune[mlflow]'"),
    "wandb": ("wandb", "pip install 'chattune[wandb]'"),
    "trackio": ("trackio", "pip install 'chattune[trackio]'"),
}


def check_track(tc: TrackConfig) -> list[tuple[str, str]]:
    """Every rule on `track`: known names, `none` alone, each tracker installed, SwanLab's name limits."""
    bad: list[tuple[str, str]] = []
    names = [tc.backend] if isinstance(tc.backend, str) else list(tc.backend)
    if "none" in names and len(names) > 1:
        bad.append(("track.backend", f"`none` cannot be combined with other trackers, got {names}"))
    for name in tc.backends:
        module, install = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            bad.append(
                (
                    "track.backend",
                    f"{name} is not installed: {install}, or remove it from track.backend",
                )
            )
    if tc.uri is not None and not tc.uri.strip():
        bad.append(("track.uri", "must be a tracking URI (e.g. http://localhost:5000) or null"))
    if "swanlab" not in tc.backends:
        return bad
    if not _SWANLAB_PROJECT.fullmatch(tc.project):
        bad.append(
            (
                "track.project",
                f"{tc.project!r} is not a SwanLab project name: 1-100 characters of 0-9 a-z A-Z _ - + . "
                "(put other text in track.experiment or track.description)",
            )
        )
    for key, value, most in [
        ("track.experiment", tc.experiment, 512),
        ("track.description", tc.description, 1024),
    ]:
        if value is not None and not 1 <= len(value) <= most:
            bad.append((key, f"must be 1-{most} characters for SwanLab (or null), got {len(value)}"))
    for i, tag in enumerate(tc.tags):
        if len(tag) > 512:
            bad.append((f"track.tags[{i}]", f"must be at most 512 characters for SwanLab, got {len(tag)}"))
    return bad


def check_output_dir(tc: TrainConfig, path: str | None = None) -> None:
    """`train.output_dir` must be a directory this process can write (or create): found at config load,
    not at the first save after the model has loaded. Creates and removes one probe file."""
    out = Path(tc.output_dir).expanduser()
    where = out
    while not where.exists():
        if where.parent == where:
            break
        where = where.parent
    if out.exists() and not out.is_dir():
        raise ConfigError(
            "train.output_dir", f"'{out}' is a file, not a directory; choose another path", path
        )
    if not where.is_dir():
        raise ConfigError(
            "train.output_dir", f"cannot create '{out}': '{where}' is a file, not a directory", path
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".chattune-probe-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(
            "train.output_dir",
            f"cannot write in '{where}' ({e.strerror or e}); choose a directory you can write to",
            path,
        ) from None


def check_methods(cfg: Config) -> list[tuple[str, str]]:
    """Fine-tuning method choices that cannot work together, refused before anything loads."""
    lora, model, tc = cfg.lora, cfg.model, cfg.train
    bad: list[tuple[str, str]] = []
    fsdp = "with train.distributed: fsdp (which shards only LoRA runs' frozen base weights); use ddp"
    if not lora.enabled:
        defaults = LoraConfig()
        for key in ("use_dora", "use_rslora", "init", "loraplus_lr_ratio", "modules_to_save"):
            if getattr(lora, key) != getattr(defaults, key):
                bad.append((f"lora.{key}", "is a LoRA option, but lora.enabled is false (full fine-tuning)"))
        if model.quantization != "none":
            bad.append(
                ("model.quantization", "quantized weights cannot be trained: set lora.enabled: true (QLoRA)")
            )
        if tc.distributed == "fsdp":
            bad.append(("lora.enabled", f"false (full fine-tuning) does not work {fsdp}"))
    if model.quantization != "none":
        if tc.device == "cpu":
            bad.append(("model.quantization", "needs a CUDA GPU (bitsandbytes); set it to none on the CPU"))
        if lora.init.partition("_niter_")[0] in MUTATING_INITS:
            bad.append(("lora.init", f"{lora.init} needs the unquantized weights to decompose; use default"))
        if tc.distributed == "fsdp":
            bad.append(("model.quantization", f"does not work {fsdp}"))
    if lora.enabled and tc.distributed == "fsdp":
        if lora.modules_to_save:
            bad.append(("lora.modules_to_save", f"does not work {fsdp}"))
        if lora.init.partition("_niter_")[0] in MUTATING_INITS:
            bad.append(
                (
                    "lora.init",
                    f"{lora.init} is converted to plain LoRA in one process; it does not work {fsdp}",
                )
            )
    if tc.precision == "fp8":
        why = "train.precision: fp8 quantizes the frozen base weights of a LoRA run"
        if not lora.enabled:
            bad.append(
                ("train.precision", f"fp8 needs lora.enabled: true ({why}; full fine-tuning trains them)")
            )
        if model.quantization != "none":
            bad.append(
                ("train.precision", "fp8 does not work with model.quantization (QLoRA); use one of them")
            )
        if lora.use_dora:
            bad.append(
                ("train.precision", "fp8 does not work with lora.use_dora (DoRA reads the bf16 weight)")
            )
        if tc.distributed == "fsdp":
            bad.append(("train.precision", "fp8 does not work with train.distributed: fsdp; use ddp or bf16"))
        if tc.device == "cpu":
            bad.append(
                ("train.precision", "fp8 needs a CUDA GPU (Hopper or newer); set it to bf16 on the CPU")
            )
    if lora.loraplus_lr_ratio is not None and tc.offload:
        bad.append(
            ("lora.loraplus_lr_ratio", "does not work with train.offload (one learning rate on the host)")
        )
    return bad


def check_run_dir_unused(path: Path, resume: bool, *, sweep: bool = False) -> None:
    """A run (or a sweep variant) starts only in a new or empty directory, unless it resumes.

    Raises ConfigError when `path` is a file, and ChattuneError naming what the folder holds and what to do
    (a new `train.output_dir`, or `--resume`) when it holds a run. `sweep`: the message of `chattune sweep`.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError("train.output_dir", f"'{path}' is a file; name a directory")
    if not path.exists() or not any(path.iterdir()) or resume:
        return
    if sweep:
        raise ChattuneError(
            f"{path} already holds a run; pass --resume to skip finished variants and continue the "
            "others, or set train.output_dir to a new folder"
        )
    if any((path / "checkpoints").glob("step-*")):
        what = ", or pass --resume to continue its last checkpoint"
    elif (path / "summary.json").exists():  # finished without checkpoints: --resume would refuse it
        what = " (it holds a finished run with no checkpoint to resume)"
    else:  # killed before its first checkpoint
        what = ", or pass --resume to train it again from the beginning in place"
    raise ChattuneError(
        f"output directory '{path}' already exists and is not empty; set train.output_dir to a new "
        f"directory or delete it{what}"
    )
