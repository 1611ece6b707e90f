"""The compare page from run directories written by hand (the files `train.run` leaves): curves drawn where
the numbers say, one metrics row per run, answers to the same prompt in one row, runs on other data or
prompts flagged, nothing fetched from the network. Real runs are compared in test_sweep.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from chattune.cli.parser import main
from chattune.config.load import config_to_dict
from chattune.config.schema import Config
from chattune.report.charts import svg_chart
from chattune.report.compare import differing_keys, write_compare
from chattune.report.reader import safetensors_numel

PROMPTS = ["你是谁？", "皇上驾到！"]


def fake_run(
    run_dir: Path,
    *,
    losses: list[float],
    eval_losses: tuple[float, float],
    r: int = 8,
    fingerprint: str = "aa" * 32,
    prompts: list[str] = PROMPTS,
    tokens_per_step: int = 100,
    answers: tuple[str, str] = ("不知道", "臣妾甄嬛。"),
) -> Path:
    """A finished run's files: train rows at steps 1.., a baseline and an `epoch 1` evaluation."""
    run_dir.mkdir(parents=True)
    tree = config_to_dict(Config())
    tree["lora"]["r"] = r
    tree["train"]["output_dir"] = str(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    steps = len(losses)
    rows = [{"step": 0, "epoch": 0.0, "tag": "baseline", "eval/loss": eval_losses[0], "eval/bleu4": 1.0}]
    rows += [{"step": i + 1, "train/loss": v, "train/lr": 1e-4} for i, v in enumerate(losses)]
    rows += [{"step": steps, "epoch": 1.0, "tag": "epoch 1", "eval/loss": eval_losses[1], "eval/bleu4": 5.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows), encoding="utf-8")
    preds = [
        {"step": step, "tag": tag, "prompt": p, "prediction": answer, "reference": "臣妾在。"}
        for step, tag, answer in [(0, "baseline", answers[0]), (steps, "epoch 1", answers[1])]
        for p in prompts
    ]
    text = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in preds)
    (run_dir / "predictions.jsonl").write_text(text, encoding="utf-8")
    summary = {
        "wall_s": 12.5,
        "train_tokens": tokens_per_step * steps,
        "steps": steps,
        "tokens_per_s": 1000.0,
        "peak_mem_gib": 1.5,
        "data": {"train_sha256": fingerprint, "sources": [{"path": "d.json", "fingerprint": fingerprint}]},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    (run_dir / "adapter").mkdir()
    return run_dir


def polylines(html: str, chart: str) -> dict[str, list[tuple[float, float]]]:
    """{run label: [(x, y) in SVG pixels]} of the chart titled `chart` (y grows downwards)."""
    svg = re.search(rf'<svg [^>]*aria-label="{re.escape(chart)}".*?</svg>', html, re.S)
    assert svg, chart
    return {
        label: [tuple(map(float, p.split(","))) for p in points.split()]
        for label, points in re.findall(r'<polyline data-run="([^"]+)" points="([^"]+)"', svg.group(0))
    }


@pytest.fixture
def two_runs(tmp_path) -> list[Path]:
    # r16 learns faster and reads twice the tokens per step (say, longer examples).
    a = fake_run(tmp_path / "runs" / "r8", losses=[3.0, 2.5, 2.0], eval_losses=(3.2, 2.4))
    b = fake_run(
        tmp_path / "runs" / "r16", losses=[3.0, 2.0, 1.0], eval_losses=(3.2, 1.6), r=16, tokens_per_step=200
    )
    return [a, b]


def test_curves_overlay_runs_where_the_numbers_say(two_runs, tmp_path):
    html_path, md_path = write_compare(two_runs, tmp_path / "out")
    html = html_path.read_text(encoding="utf-8")
    by_step = polylines(html, "train/loss by step")
    assert list(by_step) == ["r8", "r16"]
    r8, r16 = by_step["r8"], by_step["r16"]
    assert len(r8) == len(r16) == 3
    assert [x for x, _ in r8] == [x for x, _ in r16]  # the same steps line up
    assert r8[0][1] == r16[0][1]  # equal first loss: same height
    assert r16[-1][1] > r8[-1][1]  # r16's lower final loss sits lower on the page (SVG y grows down)
    by_tokens = polylines(html, "train/loss by tokens seen")
    # Twice the tokens per step: r16's last point lies further right than r8's.
    assert by_tokens["r16"][-1][0] > by_tokens["r8"][-1][0]
    assert len(polylines(html, "eval/loss by step")["r8"]) == 2  # baseline and epoch 1
    # The Markdown carries the same charts as SVG files next to it.
    md = md_path.read_text(encoding="utf-8")
    assert "](compare_files/train_loss_by_step.svg)" in md
    assert (tmp_path / "out" / "compare_files" / "train_loss_by_step.svg").read_text().startswith("<svg")


def test_metrics_one_row_per_run(two_runs, tmp_path):
    _, md_path = write_compare(two_runs, tmp_path / "out")
    md = md_path.read_text(encoding="utf-8")
    assert "| eval loss | baseline | epoch 1 | final − baseline |" in md
    assert "| r8 | 3.2 | 2.4 | -0.8 |" in md
    assert "| r16 | 3.2 | 1.6 | -1.6 |" in md
    assert "| r16 | final − baseline | +4 |" in md  # bleu4 went from 1 to 5
    # What the runs differ in is named, and shown as a row of the run facts.
    assert "They differ in lora.r (8, 16)." in md
    assert "| lora.r | 8 | 16 |" in md


def test_answers_to_one_prompt_share_a_row(two_runs, tmp_path):
    _, md_path = write_compare(two_runs, tmp_path / "out")
    md = md_path.read_text(encoding="utf-8")
    # Same base model, same baseline answers: one baseline column, then each run's last answers.
    assert "| prompt | reference | baseline (every run) | r8 (epoch 1) | r16 (epoch 1) |" in md
    assert "| 你是谁？ | 臣妾在。 | 不知道 | 臣妾甄嬛。 | 臣妾甄嬛。 |" in md


def test_different_data_and_prompts_are_flagged(tmp_path):
    base = fake_run(tmp_path / "a", losses=[2.0, 1.0], eval_losses=(2.0, 1.5))
    same = fake_run(tmp_path / "b", losses=[2.0, 1.2], eval_losses=(2.0, 1.4))
    html = write_compare([base, same], tmp_path / "o1")[0].read_text(encoding="utf-8")
    assert "⚠" not in html

    other_data = fake_run(tmp_path / "c", losses=[2.0, 1.0], eval_losses=(2.0, 1.5), fingerprint="bb" * 32)
    other_prompts = fake_run(tmp_path / "d", losses=[2.0, 1.0], eval_losses=(2.0, 1.5), prompts=["别的问题"])
    html = write_compare([base, other_data, other_prompts], tmp_path / "o2")[0].read_text(encoding="utf-8")
    assert "⚠ Different training data: the runs fall into 2 groups (a, d; c)" in html
    assert "⚠ Different evaluation data" in html  # split off different training data
    assert "⚠ Different sample prompts: the runs fall into 2 groups (a, c; d)" in html
    # Different baseline answers (other prompts): each run's baseline is shown in its own table.
    assert "d (baseline)" in html


def test_unfinished_run_is_flagged_and_still_shown(two_runs, tmp_path):
    (two_runs[1] / "summary.json").unlink()  # crashed before the end
    html = write_compare(two_runs, tmp_path / "out")[0].read_text(encoding="utf-8")
    assert "⚠ Not finished (no adapter or summary.json): r16" in html
    assert len(polylines(html, "train/loss by step")["r16"]) == 3
    # No summary, no tokens per step: no tokens-seen curve for it, and the legend says so.
    assert "r16" not in polylines(html, "train/loss by tokens seen")
    assert "r16 (not recorded)" in html


def test_page_is_self_contained_and_escapes_text(tmp_path):
    a = fake_run(tmp_path / "<b>甄嬛", losses=[2.0, 1.0], eval_losses=(2.0, 1.5))
    b = fake_run(
        tmp_path / "b", losses=[2.0, 1.0], eval_losses=(2.0, 1.5), answers=("<script>x</script>", "好")
    )
    html = write_compare([a, b], tmp_path / "out")[0].read_text(encoding="utf-8")
    assert "<script" not in html and "<link" not in html and "<b>" not in html
    assert "&lt;b&gt;甄嬛" in html
    # Nothing to fetch: the only URL is the SVG namespace.
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) == {"http://www.w3.org/2000/svg"}


def test_same_dir_names_get_told_apart(tmp_path):
    a = fake_run(tmp_path / "x" / "run", losses=[1.0], eval_losses=(1.0, 0.9))
    b = fake_run(tmp_path / "y" / "run", losses=[1.0], eval_losses=(1.0, 0.8))
    html = write_compare([a, b], tmp_path / "out")[0].read_text(encoding="utf-8")
    assert list(polylines(html, "train/loss by step")) == ["x/run", "y/run"]


def test_svg_chart_scales_into_the_plot():
    svg = svg_chart("t", "step", [("a", "#000", [(0, 1.0), (10, 3.0)]), ("b", "#111", [])])
    (points,) = re.findall(r'points="([^"]+)"', svg)
    (x0, y0), (x1, y1) = (tuple(map(float, p.split(","))) for p in points.split())
    assert x0 < x1 and y0 > y1  # right and up
    width, height = map(float, re.search(r'viewBox="0 0 (\S+) (\S+)"', svg).groups())
    assert 0 < x0 < x1 < width and 0 < y1 < y0 < height
    assert "b (not recorded)" in svg


def test_safetensors_numel_reads_the_header_only(tmp_path):
    from safetensors.numpy import save_file

    save_file(
        {"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32)}, str(tmp_path / "w.safetensors")
    )
    assert safetensors_numel(tmp_path / "w.safetensors") == 17
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    assert safetensors_numel(tmp_path / "bad.safetensors") is None


def test_differing_keys_ignore_where_runs_go(two_runs):
    from chattune.report.compare import _load

    runs = [_load(d, i) for i, d in enumerate(two_runs)]
    assert differing_keys(runs) == ["lora.r"]  # train.output_dir differs too, by construction


def test_cli_compare(two_runs, tmp_path, capsys):
    assert main(["compare", *map(str, two_runs)]) == 0  # default: beside the runs (their shared parent)
    assert (two_runs[0].parent / "compare.html").is_file()
    assert main(["compare", str(two_runs[0]), str(tmp_path / "missing")]) == 2
    assert "missing: not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    assert "holds none of config.yaml" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium to render the page with")
def test_page_renders_in_chromium(two_runs, tmp_path):
    from PIL import Image

    html_path, _ = write_compare(two_runs, tmp_path / "out")
    shot = tmp_path / "page.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    flags += ["--disable-component-update", "--disable-sync", "--no-first-run"]
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                CHROMIUM,
                *flags,
                f"--user-data-dir={profile}",
                f"--screenshot={shot}",
                "--window-size=1400,2400",
            ]
            + [html_path.as_uri()],
            capture_output=True,
            timeout=120,
            check=False,
        )
    colors = {c for _, c in Image.open(shot).convert("RGB").getcolors(1 << 24)}
    # Both runs' line colours (the palette's first two) are painted: the inline SVG charts rendered.
    assert (0x00, 0x72, 0xB2) in colors and (0xE6, 0x9F, 0x00) in colors
