"""Where a training run's first seconds go, up to the `data:` line (issue 14): a cProfile of `chattune
train`'s first stages (imports, config, `check_run`, `read_and_render`) on the shipped legal config.

  python bench/startup_run.py --model /tmp/ct/qwen2.5-7b --data /tmp/ct/legal-x4995.json --cache /tmp/x

Prints the wall time of each stage and the 25 largest cumulative entries; the rendered-data cache
under `--cache` starts empty (delete it to measure a cold render again).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--out", default="/tmp/chattune-startup-run")
    a = ap.parse_args()
    os.environ["CHATTUNE_CACHE"] = a.cache
    sys.path.insert(0, str(REPO / "src"))
    prof = cProfile.Profile()
    prof.enable()
    from chattune.config.load import load_config
    from chattune.train.job import check_run, read_and_render

    t_import = time.perf_counter()
    cfg = load_config(
        REPO / "configs" / "qwen2.5-7b-instruct-legal-fast.yaml",
        [
            f"model.name_or_path={a.model}",
            "model.source=local",
            f"data.train_path={a.data}",
            "track.backend=none",
            f"train.output_dir={a.out}",
        ],  # fmt: skip
    )
    world = check_run(cfg, False)
    t_check = time.perf_counter()
    read_and_render(cfg, world)
    t_data = time.perf_counter()
    prof.disable()
    print(
        f"STARTUP imports {t_import - t0:.2f}s, config+check_run {t_check - t_import:.2f}s, "
        f"read_and_render {t_data - t_check:.2f}s, total {t_data - t0:.2f}s",
        flush=True,
    )
    pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
