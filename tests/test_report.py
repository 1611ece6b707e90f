"""report: a fake run directory in the trainer's format renders to HTML and Markdown, escaped and complete."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from chattune.errors import ChattuneError
from chattune.report import NOT_RECORDED, write_report

CONFIG = """\
model:
  name_or_path: Qwen/Qwen2.5-0.5B-Instruct
data:
  train_path: huanhuan.json
lora:
  r: 8
train:
  lr: 0.0002
eval:
  metrics: [bleu4, rougeL]
track:
  backend: jsonl
"""

PROMPTS = ["你是谁？", "<script>alert('x')</script> 今天天气如何？"]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "huanhuan-run"
    run.mkdir()
    (run / "config.yaml").write_text(CONFIG, encoding="utf-8")
    rows: list[dict] = [{"step": 0, "epoch": 0.0, "tag": "baseline", "eval/loss": 3.2109, "eval/bleu4": 4.25}]
    for step in range(1, 21):
        rows.append(
            {
                "step": step,
                "epoch": step / 10,
                "train/loss": 3.0 - step * 0.1,
                "train/lr": 2e-4 * step / 20,
                "train/grad_norm": 1.5,
                "train/tokens_per_s": 1000.0,
                "train/peak_mem_gib": 1.25 + step / 100,
            }
        )
    rows.append({"step": 10, "epoch": 1.0, "tag": "epoch 1", "eval/loss": 2.5, "eval/bleu4": 20.5})
    # Loss and generation metrics of one evaluation logged as two rows: the table merges them.
    rows.append({"step": 20, "epoch": 2.0, "tag": "epoch 2", "eval/loss": 2.0})
    rows.append({"step": 20, "epoch": 2.0, "tag": "epoch 2", "eval/bleu4": 31.75, "eval/rougeL": 40.125})
    _write_jsonl(run / "metrics.jsonl", rows)
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"step": 21, "train/lo')  # a run killed mid-write

    preds = []
    for tag, step, answers in [
        ("baseline", 0, ["我是一个AI助手。", "抱歉 <b>不知道</b>"]),
        ("epoch 1", 10, ["我是甄嬛。", "还行"]),
        ("epoch 2", 20, ["我是甄嬛，家父是大理寺少卿甄远道。", "回皇上，今日天朗气清。"]),
    ]:
        for prompt, answer in zip(PROMPTS, answers, strict=True):
            preds.append({"step": step, "epoch": step / 10, "tag": tag, "prompt": prompt, "prediction": answer,
                          "reference": "参考答案：" + prompt[-3:]})  # fmt: skip
    _write_jsonl(run / "predictions.jsonl", preds)

    summary = {
        "wall_s": 3723.5,
        "train_tokens": 1234567,
        "tokens_per_s": 987.6,
        "peak_mem_gib": 1.45,
        "hardware": "NVIDIA H100 80GB HBM3 x1",
        "versions": {"torch": "2.13.0", "transformers": "5.23.0", "peft": "0.18.0"},
        "data": {"train": 200, "eval": 2},
    }
    (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return run


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_full_report(run_dir: Path) -> None:
    html_path, md_path = write_report(run_dir)
    assert (html_path, md_path) == (run_dir / "report.html", run_dir / "report.md")
    page = html_path.read_text(encoding="utf-8")

    # Four curves, each a real PNG inlined, and nothing fetched from outside.
    images = _images(page)
    assert len(images) == 4 and all(img.startswith(b"\x89PNG\r\n\x1a\n") for img in images)
    assert not re.search(r"(src|href)=\"(?!data:)", page)

    # Config shown as written.
    assert "name_or_path: Qwen/Qwen2.5-0.5B-Instruct" in page

    # Metrics table: evaluations in step order, the two epoch-2 rows merged, a final-vs-baseline row.
    rows = re.findall(r"<tr>(.*?)</tr>", page, flags=re.S)
    cells = [re.findall(r"<t[dh]>(.*?)</t[dh]>", r) for r in rows]
    header = next(c for c in cells if c[:1] == ["evaluation"])
    assert header == ["evaluation", "step", "epoch", "loss", "bleu4", "rougeL"]
    assert ["baseline", "0", "0", "3.211", "4.25", NOT_RECORDED] in cells
    assert ["epoch 1", "10", "1", "2.5", "20.5", NOT_RECORDED] in cells
    assert ["epoch 2", "20", "2", "2", "31.75", "40.12"] in cells
    assert ["epoch 2 − baseline", "", "", "-1.211", "+27.5", ""] in cells

    # Predictions: baseline and the final evaluation (epoch 2) side by side, user text escaped.
    assert "final answer (epoch 2)" in page
    assert "<script>" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; 今天天气如何？" in page
    assert "抱歉 &lt;b&gt;不知道&lt;/b&gt;" in page
    assert "我是甄嬛，家父是大理寺少卿甄远道。" in page
    assert "我是甄嬛。" not in page  # epoch 1 is not the final answer

    # Run facts from summary.json, and the torn last line reported rather than fatal.
    for fact in ["1h 02m 03s", "1,234,567", "987.6", "1.45", "NVIDIA H100 80GB HBM3 x1", "5.23.0", "200"]:
        assert fact in page
    assert "metrics.jsonl: 1 unreadable line(s) skipped" in page

    md = md_path.read_text(encoding="utf-8")
    for name in ["train_loss.png", "train_lr.png", "train_grad_norm.png", "eval_loss.png"]:
        assert f"](report_files/{name})" in md
        assert (run_dir / "report_files" / name).read_bytes().startswith(b"\x89PNG")
    assert "<script>" not in md and "&lt;script&gt;" in md
    assert "| epoch 2 | 20 | 2 | 2 | 31.75 | 40.12 |" in md


def test_almost_empty_run_dir(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n', encoding="utf-8")
    html_path, md_path = write_report(tmp_path)
    page = html_path.read_text(encoding="utf-8")
    assert len(_images(page)) == 1  # only train/loss was recorded
    for key in ["train/lr", "train/grad_norm", "eval/loss"]:
        assert f"{key}: {NOT_RECORDED}" in page
    # Config, metrics table, predictions and every summary fact say so instead of failing.
    assert page.count(NOT_RECORDED) >= 3 + 3 + 6
    assert NOT_RECORDED in md_path.read_text(encoding="utf-8")


def test_no_files_at_all_and_no_eval(tmp_path: Path) -> None:
    html_path, _ = write_report(tmp_path)
    page = html_path.read_text(encoding="utf-8")
    assert _images(page) == []
    assert "Predictions" in page and "Run facts" in page


def test_baseline_only_predictions(tmp_path: Path) -> None:
    _write_jsonl(
        tmp_path / "predictions.jsonl", [{"tag": "baseline", "step": 0, "prompt": "问", "prediction": "答"}]
    )
    page = write_report(tmp_path)[0].read_text(encoding="utf-8")
    row = re.findall(r"<tr><td>问</td>(.*?)</tr>", page)[0]
    assert re.findall(r"<td>(.*?)</td>", row) == ["答", NOT_RECORDED, NOT_RECORDED]


def test_stale_images_removed(run_dir: Path) -> None:
    write_report(run_dir)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n', encoding="utf-8")
    write_report(run_dir)
    assert sorted(p.name for p in (run_dir / "report_files").iterdir()) == ["train_loss.png"]


def test_missing_run_dir(tmp_path: Path) -> None:
    with pytest.raises(ChattuneError, match="not a run directory"):
        write_report(tmp_path / "nope")
