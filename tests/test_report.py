"""report: a fake run directory in the trainer's format renders to HTML and Markdown, escaped and complete."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from chattune.errors import ChattuneError
from chattune.report.reader import NOT_RECORDED
from chattune.report.run_report import write_report

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
    (tmp_path / "config.yaml").write_text("", encoding="utf-8")  # a run that stopped as it began
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
    with pytest.raises(ChattuneError, match="not a directory"):
        write_report(tmp_path / "nope")
    (tmp_path / "data.json").write_text("[]", encoding="utf-8")  # a folder, but not a run's
    with pytest.raises(ChattuneError, match="is it a run's train.output_dir"):
        write_report(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]  # nothing written into it


class _Structure(HTMLParser):
    """What a browser builds from the page: headings in order, tables as rows of cells, images, and
    whether every element that was opened was closed in order (a stray tag would swallow what follows)."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.mismatched: list[str] = []
        self.headings: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self._text: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag in self.VOID:
            return
        self.open.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("h2", "td", "th"):
            self._text = []

    def handle_endtag(self, tag):
        if not self.open or self.open.pop() != tag:
            self.mismatched.append(tag)
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._text or []))
            self._text = None
        elif tag == "h2":
            self.headings.append("".join(self._text or []))
            self._text = None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)


def _structure(page: str) -> _Structure:
    parser = _Structure()
    parser.feed(page)
    parser.close()
    return parser


def test_page_structure_without_a_browser(run_dir: Path) -> None:
    page = write_report(run_dir)[0].read_text(encoding="utf-8")
    doc = _structure(page)
    assert doc.mismatched == [] and doc.open == []
    # The result first, the resolved config last (issue 25: it used to open the page).
    assert doc.headings == ["Result", "Predictions", "Curves", "Metrics", "Run facts", "Notes", "Config"]
    assert len(doc.images) == 4 and all(src.startswith("data:image/png;base64,") for src in doc.images)
    result, cost, predictions, metrics, facts = doc.tables
    assert result[0] == ["metric", "baseline", "epoch 2 (final)", "change"]
    assert ["eval/bleu4", "4.25", "31.75", "+27.5"] in result
    assert dict(cost[1:])["tokens/s"] == "987.6"
    assert "<details><summary>resolved config" in page
    for table in doc.tables:  # every row has a cell under every header
        assert {len(row) for row in table} == {len(table[0])}
    assert [row[0] for row in metrics] == [
        "evaluation",
        "baseline",
        "epoch 1",
        "epoch 2",
        "epoch 2 − baseline",
    ]
    # Before/after answers side by side, with the user's markup shown as text, not run.
    assert predictions[0] == ["prompt", "baseline answer", "final answer (epoch 2)", "reference"]
    assert predictions[2] == [
        "<script>alert('x')</script> 今天天气如何？",
        "抱歉 <b>不知道</b>",
        "回皇上，今日天朗气清。",
        "参考答案：如何？",
    ]
    facts = dict(facts[1:])
    assert facts["wall time"] == "1h 02m 03s (3,723.5 s)" and facts["tokens/s"] == "987.6"
    assert facts["peak memory (GiB)"] == "1.45" and facts["hardware"] == "NVIDIA H100 80GB HBM3 x1"


def test_untagged_metrics_rows_are_named_from_the_run(tmp_path: Path) -> None:
    # metrics.jsonl written before tags were kept there (tag: null): names come from summary.json.
    _write_jsonl(
        tmp_path / "metrics.jsonl",
        [
            {"step": 0, "tag": None, "eval/loss": 3.0},
            {"step": 5, "train/loss": 2.0},
            {"step": 5, "tag": None, "eval/loss": 2.0},
        ],
    )
    evaluations = [{"step": 0, "tag": "baseline", "eval/loss": 3.0}, {"step": 5, "tag": "epoch 1"}]
    (tmp_path / "summary.json").write_text(json.dumps({"evaluations": evaluations}), encoding="utf-8")
    doc = _structure(write_report(tmp_path)[0].read_text(encoding="utf-8"))
    _result, _cost, metrics, facts = doc.tables  # no predictions table: none were made
    assert metrics[1:] == [["baseline", "0", NOT_RECORDED, "3"], ["epoch 1", "5", NOT_RECORDED, "2"],
                           ["epoch 1 − baseline", "", "", "-1"]]  # fmt: skip
    assert "evaluations" not in dict(facts[1:])  # shown once, in the metrics table


SCREENSHOT = Path(__file__).resolve().parents[1] / "tools" / "screenshot_report.sh"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)")
def test_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    """The page as a real browser draws it: the inlined curve images decode and show their lines."""
    from matplotlib.image import imread

    html_path, _ = write_report(run_dir)
    png = tmp_path / "shot.png"
    env = {**os.environ, "SCREENSHOT_NO_INSTALL": "1"}
    proc = subprocess.run(
        ["bash", str(SCREENSHOT), str(html_path), str(png), "1280,2400"],
        capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    pixels = (imread(png)[..., :3] * 255).round()
    assert pixels.shape[:2] == (2400, 1280)
    # matplotlib's first line colour (#1f77b4) appears only inside the four plotted curves: ~900 pixels
    # here, 0 when the inlined images do not decode (checked by corrupting their base64).
    line = (abs(pixels - [31, 119, 180]).max(axis=-1) <= 8).sum()
    assert line > 4 * 100
    assert (pixels < 128).all(axis=-1).sum() > 2000  # text was drawn, not a blank page
