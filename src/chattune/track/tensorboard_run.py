"""The TensorBoard backend of `build_tracker`: scalars, the config and the sample answers as text.

Writes `<run dir>/tensorboard/` with torch's `SummaryWriter`; view with `tensorboard --logdir <run dir>`.
A resumed run appends to the same folder (TensorBoard shows one run).
"""

from __future__ import annotations

import json
from pathlib import Path

from chattune.track.rows import PREDICTION_KEY, markdown_table


class TensorBoardBackend:
    name = "TensorBoard"
    run_id = None  # TensorBoard has no run id: the folder is the run

    def __init__(self, log_dir: Path, hparams: dict):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))
        # add_hparams would start a second run dir; the config as text sits beside the scalars instead.
        config = json.dumps(hparams, indent=2, ensure_ascii=False)
        self._writer.add_text("hparams", f"```json\n{config}\n```", global_step=0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=step)

    def log_predictions(self, rows: list[dict], step: int, tag: str) -> None:
        self._writer.add_text(PREDICTION_KEY, markdown_table(rows, f"{tag} (step {step})"), global_step=step)

    def log_summary(self, summary: dict[str, float], step: int) -> None:
        self.log(summary, step)

    def finish(self, error: BaseException | None) -> None:
        self._writer.close()
