"""`chattune sweep`: one config, several variants, each an ordinary run, then one compare page.

CONFIG + `--vary KEY=V1,V2` (or the config's `sweep.vary`) -> variants, every combination of the values
-> each variant = `chattune train CONFIG <overrides> train.output_dir=<base>/<slug>` in its own process,
one after another, or one per GPU with `--gpus N` -> `<base>/sweep.json` (what ran, how it ended)
-> `<base>/compare.html` (compare.py). A variant that fails is reported; the others go on.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import chattune
from chattune.config.checks import check_run_dir_unused
from chattune.config.load import load_config
from chattune.console import say
from chattune.errors import ChattuneError, ConfigError

_MANIFEST_LOCK = threading.Lock()  # variants on several GPUs finish in any order
# Keys a variant may not vary: the sweep owns where each run goes and what the sweep itself is.
_RESERVED = ("train.output_dir", "sweep.")


@dataclass
class Variant:
    """One run of the sweep: its overrides (`section.key=value`, as typed) and where it writes."""

    slug: str
    overrides: list[str]
    run_dir: Path
    status: str = "pending"  # pending | skipped (already finished) | done | failed
    returncode: int | None = None
    seconds: float | None = None
    log_path: Path | None = None


def split_values(raw: str) -> list[str]:
    """`a,b,[c,d],"e,f"` -> ["a", "b", "[c,d]", '"e,f"']: commas inside brackets or quotes do not split."""
    values, depth, quote, current = [], 0, "", ""
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += ch
    values.append(current.strip())
    return values


def parse_vary(items: list[str], where: str) -> dict[str, list[str]]:
    """`["lora.r=8,16", "train.lr=1e-4,2e-4"]` -> {"lora.r": ["8", "16"], ...}; values stay text, parsed
    later exactly as a `chattune train` override. A key given twice keeps its last values."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or "." not in key or not raw.strip():
            raise ConfigError(item, "a variation looks like section.key=V1,V2,... (e.g. lora.r=8,16)", where)
        if key == _RESERVED[0] or key.startswith(_RESERVED[1]):
            raise ConfigError(key, "a sweep sets this itself; vary another key", where)
        values = split_values(raw)
        if any(v == "" for v in values) or len(set(values)) != len(values):
            raise ConfigError(key, f"values must be non-empty and distinct, got {raw!r}", where)
        out[key] = values
    return out


def slug_of(assignment: list[tuple[str, str]]) -> str:
    """A short folder name from a variant's values: `model.name_or_path=Qwen/Qwen2.5-7B-Instruct` ->
    `Qwen2.5-7B-Instruct`, `lora.r=16` -> `r16`, `data.train_path=d/a.json` -> `train_path-a.json`,
    joined with `_`; only [A-Za-z0-9._-] survive (build_variants keeps colliding names apart)."""
    parts = []
    for key, value in assignment:
        value = value.strip("\"'")
        if "/" in value.rstrip("/"):  # a path or hub id: its last part names it
            value = value.rstrip("/").rsplit("/", 1)[-1]
        name = key.rsplit(".", 1)[-1]
        if key == "model.name_or_path":
            parts.append(value.removeprefix("builtin:"))
        elif re.fullmatch(r"[-+]?[0-9.]+(e[-+]?[0-9]+)?", value, re.I):
            parts.append(name + value)  # r16, lr2e-4, max_len512
        else:
            parts.append(f"{name}-{value}")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts))
    slug = re.sub(r"-{2,}", "-", slug).strip("-.") or "variant"
    return slug[:80]


def build_variants(vary: dict[str, list[str]], base_dir: Path) -> list[Variant]:
    """Every combination of the values, in the order given (the first key changes slowest)."""
    keys = list(vary)
    combos = [list(zip(keys, values, strict=True)) for values in itertools.product(*vary.values())]
    slugs = [slug_of(c) for c in combos]
    variants = []
    for combo, slug in zip(combos, slugs, strict=True):
        if slugs.count(slug) > 1:  # e.g. two local models both named `model`: keep the folders apart
            text = json.dumps(combo)
            slug = f"{slug}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"
        variants.append(Variant(slug, [f"{k}={v}" for k, v in combo], base_dir / slug))
    return variants


def is_finished(run_dir: Path) -> bool:
    """The trainer writes the adapter, then summary.json, last: both present means the run completed."""
    return (run_dir / "adapter" / "adapter_model.safetensors").is_file() and (
        run_dir / "summary.json"
    ).is_file()


def run_sweep(
    config: str | Path,
    overrides: list[str],
    vary: list[str],
    *,
    resume: bool = False,
    gpus: int | None = None,
) -> int:
    """Run every variant, write sweep.json and the compare page; return the number of failed variants.

    Every variant's config is checked before the first one starts, so a typo in a value fails at once.
    Raises ConfigError for bad variations, ChattuneError when a variant's folder already holds a run
    and `resume` is not set.
    """
    base_cfg = load_config(config, overrides)
    where = str(config)
    merged = {**parse_vary(list(base_cfg.sweep.vary), where), **parse_vary(vary, "--vary")}
    if not merged:
        raise ConfigError("sweep.vary", "nothing to vary: give --vary KEY=V1,V2 or a sweep.vary list", where)
    name = base_cfg.sweep.name or Path(config).stem
    base_dir = Path(base_cfg.train.output_dir).resolve()
    variants = build_variants(merged, base_dir)
    track = base_cfg.track
    group = track.group or name
    tags = list(dict.fromkeys([*track.tags, name]))
    shared = []
    if "mlflow" in track.backends and not track.uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        # One MLflow store for the sweep (each variant's own run dir would hold a store of one run), so
        # that the variants sit side by side in one experiment, named by the group.
        store = f"sqlite:///{base_dir / 'mlflow.db'}"
        shared.append(f"track.uri={json.dumps(store)}")
    for v in variants:
        experiment = f"{track.experiment}-{v.slug}" if track.experiment else v.slug
        v.overrides += [
            f"train.output_dir={v.run_dir}",
            f"track.group={json.dumps(group, ensure_ascii=False)}",
            f"track.tags={json.dumps(tags, ensure_ascii=False)}",
            f"track.experiment={json.dumps(experiment, ensure_ascii=False)}",
            *shared,
        ]
        load_config(config, [*overrides, *v.overrides])  # raises naming the key and value
        check_run_dir_unused(v.run_dir, resume, sweep=True)

    base_dir.mkdir(parents=True, exist_ok=True)
    manifest = base_dir / "sweep.json"
    todo = []
    for v in variants:
        if resume and is_finished(v.run_dir):
            v.status = "skipped"
            say(f"sweep: {v.slug} finished earlier; skipped")
        else:
            todo.append(v)
    _write_manifest(manifest, name, config, overrides, merged, variants)
    say(f"sweep {name!r}: {len(variants)} variants ({len(todo)} to run) under {base_dir}")

    launch = functools.partial(
        _launch_variant,
        config=config,
        overrides=overrides,
        resume=resume,
        base_dir=base_dir,
        save_manifest=lambda: _write_manifest(manifest, name, config, overrides, merged, variants),
    )
    devices = _pick_gpus(gpus)
    if devices is None:
        for v in todo:
            launch(v, None)
    else:
        free: queue.Queue[int] = queue.Queue()
        for d in devices:
            free.put(d)

        def on_a_gpu(v: Variant) -> None:
            gpu = free.get()
            try:
                launch(v, gpu)
            finally:
                free.put(gpu)

        with ThreadPoolExecutor(max_workers=len(devices)) as pool:
            list(pool.map(on_a_gpu, todo))

    _write_compare(base_dir, name, variants)
    failed = [v for v in variants if v.status == "failed"]
    for v in variants:
        took = f"{v.seconds:.0f}s" if v.seconds is not None else ""
        say(f"  {v.status:8} {v.slug:40} {took}")
    return len(failed)


def _launch_variant(
    v: Variant,
    gpu: int | None,
    *,
    config: str | Path,
    overrides: list[str],
    resume: bool,
    base_dir: Path,
    save_manifest: Callable[[], None],
) -> None:
    """Run one variant as `python -m chattune train ...` in its own process (on `gpu`, logging to a file, when
    variants run side by side), and record its status, exit code and seconds in `v` and the manifest."""
    cmd = [sys.executable, "-m", "chattune", "train", str(config), *overrides, *v.overrides]
    if resume and v.run_dir.exists() and any(v.run_dir.iterdir()):
        if any((v.run_dir / "checkpoints").glob("step-*")):
            cmd.append("--resume")  # train's own resume: from its last checkpoint
        else:  # interrupted before its first checkpoint: start again, keeping what it wrote aside
            aside = _free_path(v.run_dir.with_name(v.run_dir.name + ".interrupted"))
            v.run_dir.rename(aside)
            say(f"sweep: {v.slug} stopped before its first checkpoint; its files moved to {aside}")
    env = dict(os.environ)
    # The variants run the chattune this sweep runs, also from a source checkout that is not installed.
    src = str(Path(chattune.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else src
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    v.status = "running"
    save_manifest()
    say(
        f"sweep: starting {v.slug}" + (f" on GPU {gpu}" if gpu is not None else "") + f": {' '.join(cmd[3:])}"
    )
    t0 = time.time()
    if gpu is None:
        v.returncode = subprocess.call(cmd, env=env)  # one at a time: its output goes to the terminal
    else:  # side by side: each variant to its own log, or the terminal would interleave them
        v.log_path = base_dir / "logs" / f"{v.slug}.log"
        v.log_path.parent.mkdir(exist_ok=True)
        with open(v.log_path, "ab") as log:
            v.returncode = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    v.seconds = time.time() - t0
    v.status = "done" if v.returncode == 0 and is_finished(v.run_dir) else "failed"
    save_manifest()
    if v.status == "failed":
        where_log = f"; its log: {v.log_path}" if v.log_path else ""
        say(f"sweep: {v.slug} FAILED (exit code {v.returncode}){where_log}; going on with the others")
    else:
        say(f"sweep: {v.slug} done in {v.seconds:.0f}s")


def _pick_gpus(gpus: int | None) -> list[int] | None:
    """GPU indices to run variants on side by side, or None for one after another."""
    if gpus is None or gpus == 1:
        return None
    if gpus < 1:
        raise ChattuneError(f"--gpus must be at least 1, got {gpus}")
    import torch

    have = torch.cuda.device_count()
    if have == 0:
        say(f"sweep: --gpus {gpus} but no CUDA GPU; running the variants one after another")
        return None
    if have < gpus:
        raise ChattuneError(f"--gpus {gpus}: only {have} GPU(s) visible (CUDA_VISIBLE_DEVICES)")
    # Indices within what this process sees: a CUDA_VISIBLE_DEVICES list is mapped back to its ids.
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return [int(visible[i]) if visible and visible[i].isdigit() else i for i in range(gpus)]


def _write_compare(base_dir: Path, name: str, variants: list[Variant]) -> None:
    from chattune.report.compare import write_compare

    runs = [v.run_dir for v in variants if (v.run_dir / "config.yaml").is_file()]
    if not runs:
        say("sweep: no variant wrote anything; no compare page")
        return
    try:
        html, _ = write_compare(runs, base_dir, title=f"chattune sweep: {name}")
        say(f"sweep: compare page {html}")
    except Exception as e:  # the runs are done; a page problem must not hide that
        say(f"warning: could not write the compare page: {e}")


def _write_manifest(path: Path, name: str, config, overrides, vary, variants: list[Variant]) -> None:
    record = {
        "name": name,
        "config": str(Path(config).resolve()),
        "overrides": list(overrides),
        "vary": vary,
        "variants": [
            {**asdict(v), "run_dir": str(v.run_dir), "log_path": str(v.log_path) if v.log_path else None}
            for v in variants
        ],
    }
    with _MANIFEST_LOCK:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, ensure_ascii=False, indent=2), encoding="utf-8")
        tmp.replace(path)  # a reader never sees half a file


def _free_path(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate
