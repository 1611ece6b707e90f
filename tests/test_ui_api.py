"""`chattune ui`'s HTTP API through FastAPI's TestClient: the form covers every config key with its
docstring; bad fields and requests get 4xx naming the field; no path outside the runs directory is
served; Host and API-key checks; both languages have every string; every asset is in the package; and
with real `chattune train` processes: start, a second start refused, the live stream, stop (marked
interrupted), resume, and a run started from the shell shown like one started here, with chat."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import shutil
import subprocess
import typing
from pathlib import Path

import pytest
from ui_runs import child_env, form_values, shell_run, train_rows, wait_for

from chattune.config.schema import Config
from chattune.ui import schema
from chattune.ui.app import STATIC, build_app
from chattune.ui.launch import cli_argv

BASE = "http://127.0.0.1:7860"


@pytest.fixture()
def runs_dir(tmp_path) -> Path:
    return tmp_path / "runs"


@pytest.fixture()
def client(runs_dir):
    from fastapi.testclient import TestClient

    with TestClient(build_app(runs_dir), base_url=BASE) as c:
        yield c


def _config_keys(cls, prefix: str) -> list[str]:
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        out += _config_keys(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else [prefix + f.name]
    return out


def test_form_has_every_config_key_with_its_docstring(client):
    sections = client.get("/api/schema").json()
    keys = [f["key"] for s in sections for f in s["fields"]]
    assert keys == _config_keys(Config, "")  # every key, in the config's order, none invented
    by_key = {f["key"]: f for s in sections for f in s["fields"]}
    # The help text is the docstring under the field in config.py, whole.
    assert by_key["data.train_path"]["doc"].startswith(
        "Training data, one source or a list mixed in one run."
    )
    assert "SwanLab mode" in by_key["track.mode"]["doc"]
    assert by_key["data.columns.prompt"]["doc"] == "Column holding the instruction (alpaca `instruction`)."
    assert by_key["train.lr_schedule"]["choices"] == ["cosine", "linear", "constant"]
    assert by_key["lora.enabled"]["kind"] == "bool" and by_key["lora.enabled"]["text"] is True
    assert by_key["train.max_steps"]["nullable"] and by_key["train.max_steps"]["text"] == ""
    assert [s["section"] for s in sections] == [f.name for f in dataclasses.fields(Config)]
    # Every key with a docstring under it in the source has it in the form (read here by a plain regex,
    # not by the form's own AST walk); the rest are keys the config leaves unexplained.
    for key, f in by_key.items():
        *path, name = key.split(".")
        cls = Config
        for part in path:
            cls = typing.get_type_hints(cls)[part]
        has_doc = re.search(rf'^    {name}: [^\n]*\n    """', inspect.getsource(cls), re.M) is not None
        assert bool(f["doc"]) == has_doc, key


def test_form_values_round_trip_a_config():
    tree = {
        "data": {"train_path": ["a.json", "hf:x/y"], "columns": {"prompt": "question"}},
        "train": {"lr": 2e-4},
    }
    values = schema.values_from_tree(tree)
    assert values == {
        "data.train_path": "[a.json, 'hf:x/y']",
        "data.columns.prompt": "question",
        "train.lr": "0.0002",
    }
    assert schema.to_tree(values) == tree
    assert schema.to_tree({"train.max_steps": "", "lora.enabled": True}) == {}  # defaults are not written


@pytest.mark.parametrize(
    "values, field, words",
    [
        ({"train.lr": "abc"}, "train.lr", "expected float"),
        ({"lora.r": "-4"}, "lora.r", "positive"),
        ({"train.lr_schedule": "wavy"}, "train.lr_schedule", "one of"),
        ({"train.lrr": "1"}, "train.lrr", "no such config key"),
        ({"lora.enabled": "yes"}, "lora.enabled", "true or false"),
        ({"lora.target_modules": "[q_proj"}, "lora.target_modules", "YAML"),
        ({"train.output_dir": "/tmp/elsewhere"}, "train.output_dir", "inside the runs directory"),
        ({"train.output_dir": "runs/../../x"}, "train.output_dir", "inside the runs directory"),
    ],
)
def test_bad_form_field_is_a_422_naming_it(client, values, field, words):
    r = client.post("/api/config/check", json={"values": values})
    assert r.status_code == 422 and r.json()["field"] == field
    assert field in r.json()["error"] and words in r.json()["error"]
    r = client.post("/api/runs", json={"values": values})  # Start checks the same way, and starts nothing
    assert r.status_code == 422 and r.json()["field"] == field


def test_bad_requests_are_4xx_with_a_message(client):
    assert (
        client.post(
            "/api/config/check", content=b"{", headers={"content-type": "application/json"}
        ).status_code
        == 400
    )
    assert client.post("/api/config/check", json=[1]).status_code == 400
    assert (
        client.post("/api/config/check", content=b"{}", headers={"content-type": "text/plain"}).status_code
        == 415
    )
    assert client.post("/api/config/check", json={"values": 3}).status_code == 422
    big = {"text": "x" * (3 * 2**20)}
    assert client.post("/api/config/from-yaml", json=big).status_code == 413
    r = client.post("/api/config/from-yaml", json={"text": "train: {lr: [1, 2]}"})
    assert r.status_code == 422 and r.json()["field"] == "train.lr"
    r = client.post("/api/config/from-yaml", json={"text": "train: {lr: 3e-4, max_steps: 7}"})
    assert r.json()["values"] == {"train.lr": "3e-4", "train.max_steps": "7"}
    r = client.post("/api/config/from-yaml", json={"text": "train:\n  lr: 1\n  lr: 2\n"})
    assert r.status_code == 422 and "given twice" in r.json()["error"], r.json()  # as `chattune train` says
    assert client.delete("/api/runs").status_code == 405
    for r in (client.get("/api/runs/nothing/events"), client.post("/api/runs/nothing/stop")):
        assert r.status_code == 404 and "nothing" in r.json()["error"]
    for r in [client.get("/api/nope"), client.get("/static/nope.js")]:
        assert r.status_code == 404 and "Traceback" not in r.text


def test_no_path_outside_the_runs_dir_is_served(client, runs_dir, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "report.html").write_text("SECRET", encoding="utf-8")
    (secret / "config.yaml").write_text("train: {lr: 0.5}", encoding="utf-8")
    (runs_dir / "link").symlink_to(secret)  # a symlink out of the runs directory
    for path in [
        "/runs/link/report.html",
        "/api/runs/link/config",
        "/runs/%2e%2e/secret/report.html",
        "/runs/..%2Fsecret/report.html",
        "/api/runs/..%2Fsecret/config",
        "/api/runs/%2Ftmp/config",
        "/api/runs/.chattune-ui/config",
        "/api/runs/a/b/c/config",
        "/static/..%2F..%2Fapp.py",
    ]:
        r = client.get(path)
        assert 400 <= r.status_code < 500 and "SECRET" not in r.text and "0.5" not in r.text, path
    assert client.get("/api/runs").json() == []  # the symlinked folder is not listed either


def test_host_header_and_api_key(runs_dir):
    from fastapi.testclient import TestClient

    c = TestClient(build_app(runs_dir), base_url=BASE)
    assert c.get("/api/meta", headers={"host": "evil.example:7860"}).status_code == 403  # DNS rebinding
    r = c.post("/api/config/check", json={"values": {}}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403  # another site's page posting to the loopback UI
    keyed = TestClient(build_app(runs_dir, api_key="k3y", allowed_hosts=()), base_url="http://10.1.2.3:7860")
    assert keyed.get("/api/meta").status_code == 401
    assert keyed.get("/api/meta", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert keyed.get("/api/meta", headers={"authorization": "Bearer k3y"}).status_code == 200
    assert keyed.get("/?key=k3y").status_code == 200  # sets the cookie the page's own requests carry
    assert keyed.get("/api/meta").status_code == 200


def test_both_languages_have_every_string():
    strings = json.loads((STATIC / "i18n.json").read_text(encoding="utf-8"))
    assert set(strings) == {"en", "zh"} and strings["en"].keys() == strings["zh"].keys()
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    js = (STATIC / "app.js").read_text(encoding="utf-8")
    used = set(re.findall(r'data-i18n="([^"]+)"', html)) | set(re.findall(r'\bt\("([^"]+)"\)', js))
    used |= {label for _, label in re.findall(r'\["([^"]+)", "(chart\.[^"]+)"\]', js)}
    used |= {f"state.{s}" for s in ("starting", "running", "finished", "interrupted", "failed", "unknown")}
    assert len(used) > 50 and used <= strings["en"].keys(), used - strings["en"].keys()
    assert all(strings["zh"][k] != strings["en"][k] for k in ("tab.runs", "run.stop", "new.start"))


def test_every_asset_ships_in_the_package_and_nothing_is_fetched_from_elsewhere():
    import tomllib
    from conftest import REPO

    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "ui/static/**/*" in package_data["chattune"]
    assert (STATIC / "vendor" / "uplot" / "LICENSE").read_text().startswith("The MIT License")
    for path in STATIC.rglob("*"):
        if path.suffix in (".html", ".js", ".css", ".json"):
            text = path.read_text(encoding="utf-8")
            # The vendored chart library names the SVG namespace and, in its licence banner, its home page:
            # names, not requests (and the page's Content-Security-Policy allows only its own origin).
            urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"')]*", text))
            urls -= {"http://www.w3.org/2000/svg", "https://github.com/leeoniya/uPlot"}
            assert not {u for u in urls if not u.startswith("//")} and "@import" not in text, (path, urls)


def _events(client, run_id: str, until) -> dict:
    """Read the run's server-sent events until `until(state)` is true; returns the merged state."""
    seen = {"metrics": [], "predictions": [], "kinds": []}
    with client.stream("GET", f"/api/runs/{run_id}/events") as s:
        event = None
        for line in s.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "run":
                d = json.loads(line[6:])
                seen["kinds"].append(d["kind"])
                seen["metrics"] += d["metrics"]
                seen["predictions"] += d["predictions"]
                seen.update(
                    overview=d["overview"],
                    log=d["log"],
                    progress=d["progress"],
                    command=seen.get("command") or d.get("command"),
                )
                if until(seen):
                    return seen
            elif line.startswith("data: ") and event == "end":
                seen["ended"] = json.loads(line[6:])["state"]
                return seen
    return seen


def test_start_stream_stop_resume_a_real_run(client, runs_dir, tmp_path):
    from conftest import write_huanhuan_slice

    data = write_huanhuan_slice(tmp_path, 20)
    values = form_values(data, runs_dir / "live", max_steps=500)
    r = client.post("/api/runs", json={"values": values})
    assert r.status_code == 201, r.text
    assert r.json()["command"] == f"chattune train {runs_dir / '.chattune-ui' / 'live' / 'config.yaml'}"
    assert (
        os.getsid(r.json()["pid"]) == r.json()["pid"]
    )  # its own session: stopping the UI leaves it training
    again = client.post("/api/runs", json={"values": values})
    assert again.status_code == 409 and "stop it first" in again.json()["error"]
    # Live: the stream delivers the loss points as the run writes them.
    seen = _events(client, "live", lambda s: sum("train/loss" in m for m in s["metrics"]) >= 3)
    assert seen["kinds"][0] == "snapshot" and seen["overview"]["state"] == "running"
    assert 0 < seen["progress"]["fraction"] < 1 and "$ chattune train" in seen["log"]
    assert [p["tag"] for p in seen["predictions"]] == ["baseline"]
    # A second connection (a reload, another tab) starts with a snapshot of everything so far.
    again = _events(client, "live", lambda s: True)
    assert again["kinds"] == ["snapshot"] and len(again["metrics"]) >= len(seen["metrics"])
    assert client.post("/api/runs/live/stop").json()["signal"] == "SIGTERM"
    seen = _events(client, "live", lambda s: False)
    assert seen["ended"] == "interrupted"
    run_state = json.loads((runs_dir / "live" / "run_state.json").read_text())
    assert run_state["state"] == "interrupted"  # written by `chattune train` itself, on SIGTERM
    assert not (runs_dir / "live" / "adapter").exists()  # no half adapter
    assert client.post("/api/runs/live/stop").status_code == 409
    assert any((runs_dir / "live" / "checkpoints").glob("step-*"))
    # Resume: `chattune train --resume` from the last checkpoint; the resume rules speak in the log.
    r = client.post("/api/runs/live/resume")
    assert r.status_code == 200 and r.json()["command"].endswith("--resume")
    wait_for(lambda: _resumed(runs_dir), 300, "the resumed run's first steps")
    assert client.post("/api/runs/live/stop").status_code == 200
    wait_for(lambda: client.get("/api/runs").json()[0]["state"] == "interrupted", 120, "the second stop")


def _resumed(runs_dir: Path) -> bool:
    log = (runs_dir / ".chattune-ui" / "live" / "train.log").read_text(encoding="utf-8", errors="replace")
    return (
        "resuming from" in log
        and train_rows(runs_dir / "live") > 0
        and '"state": "running"' in (runs_dir / "live" / "run_state.json").read_text()
    )


def test_a_run_from_the_shell_shows_up_the_same_and_chats(client, runs_dir, one_torch_thread):
    run = shell_run(runs_dir, "shell")
    shutil.copytree(run, runs_dir / "shell-copy")  # a second finished run, for the compare page
    rows = {r["id"]: r for r in client.get("/api/runs").json()}
    assert rows.keys() == {"shell", "shell-copy"}
    row = rows["shell"]
    assert row["state"] == "finished" and row["steps"] == 2 and row["report"] and row["adapter"]
    assert row["model"] == "builtin:tiny-qwen2" and not row["launched_here"]
    seen = _events(client, "shell", lambda s: False)  # a finished run: one snapshot, then the end
    assert (
        seen["ended"] == "finished"
        and train_rows(run) == sum("train/loss" in m for m in seen["metrics"]) == 2
    )
    assert seen["command"] is None and seen["log"] == ""  # not started here: no command, no log
    assert "<html" in client.get("/runs/shell/report.html").text
    page = client.get("/api/compare", params=[("id", "shell"), ("id", "shell-copy")])
    assert page.status_code == 200 and "shell-copy" in page.text
    assert client.get("/api/compare", params=[("id", "shell")]).status_code == 422
    # The GGUF size shown: the weights' bytes (a real export's file minus the same tokenizer and metadata
    # bytes for every type, up to the 32-byte alignment of each tensor).
    overhead = set()
    for dtype in ("f16", "q8_0"):
        estimate = client.get("/api/runs/shell/gguf-size", params={"dtype": dtype}).json()["bytes"]
        gguf = runs_dir.parent / f"shell-{dtype}.gguf"
        subprocess.run(
            cli_argv("export", str(run / "adapter"), "--output", str(gguf), "--dtype", dtype),
            env=child_env(),
            check=True,
            capture_output=True,
        )
        overhead.add(gguf.stat().st_size - estimate)
    assert max(overhead) - min(overhead) < 32 * 30 and 0 < min(overhead) < 8 * 2**20
    assert client.get("/api/runs/shell/gguf-size", params={"dtype": "q4"}).status_code == 422
    values = client.get("/api/runs/shell/config").json()["values"]
    assert values["train.max_steps"] == "2" and values["train.output_dir"] == str(run)
    # Chat: base and fine-tune, streamed as server-sent events.
    for base in (True, False):
        body = {"messages": [{"role": "user", "content": "你是谁？"}], "base": base, "max_new_tokens": 5}
        r = client.post("/api/chat/shell", json=body)
        events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: ")]
        assert r.status_code == 200 and events[-1]["done"] in ("length", "stop")
        assert "".join(e.get("text", "") for e in events) and len(events) >= 2
    r = client.post("/api/chat/shell", json={"messages": [{"role": "user"}]})
    assert r.status_code == 400 and "content" in r.json()["error"]
    assert client.post("/api/chat/shell", json={"messages": []}).status_code == 422
    assert (
        client.post(
            "/api/chat/shell", json={"messages": [{"role": "user", "content": "x"}], "max_new_tokens": 0}
        ).status_code
        == 422
    )


def test_data_panel_runs_chattune_data_on_the_form(client, runs_dir, tmp_path):
    from conftest import write_huanhuan_slice

    values = form_values(write_huanhuan_slice(tmp_path, 20), runs_dir / "d", max_steps=2)
    r = client.post("/api/data", json={"values": values, "command": "preview"})
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
    assert r.json()["command"].startswith("chattune data preview ")
    trained = re.findall(r"\[\[(.*?)\]\]", r.json()["output"], re.S)
    assert trained.pop() == "like this"  # the legend line
    assert len(trained) == 5 and all(
        span.endswith("<|im_end|>") for span in trained
    )  # the end of turn is trained
    r = client.post("/api/data", json={"values": values, "command": "rm"})
    assert r.status_code == 422 and r.json()["field"] == "command"
    r = client.post("/api/data", json={"values": {**values, "data.max_len": "0"}, "command": "check"})
    assert r.status_code == 422 and r.json()["field"] == "data.max_len"
    assert not (runs_dir / "d").exists()  # looking at the data starts no run


def test_shipped_configs_load_into_the_form(runs_dir, monkeypatch):
    from conftest import REPO
    from fastapi.testclient import TestClient

    monkeypatch.chdir(REPO)  # the UI started in a checkout lists its configs/
    c = TestClient(build_app(runs_dir), base_url=BASE)
    names = c.get("/api/configs").json()
    assert "qwen2.5-7b-instruct-legal.yaml" in names
    values = c.get("/api/configs/qwen2.5-7b-instruct-legal.yaml").json()["values"]
    assert values["model.name_or_path"] == "Qwen/Qwen2.5-7B-Instruct"
    assert Path(values["data.train_path"]).is_absolute()  # relative to the config file, as train reads it
    for bad in ("..%2Fpyproject.toml", "%2Fetc%2Fpasswd", "nope.yaml"):
        assert c.get(f"/api/configs/{bad}").status_code == 404


def test_run_state_records_how_a_run_ended(tmp_path):
    from chattune.train.rundir import read_run_state, recording_end_state, write_run_state

    for error, state in [(ValueError("diverged"), "failed"), (KeyboardInterrupt(), "interrupted")]:
        with pytest.raises(type(error)), recording_end_state(tmp_path):
            write_run_state(tmp_path, "running")  # what open_run_dir writes once the run directory exists
            raise error
        recorded = read_run_state(tmp_path)
        assert recorded["state"] == state and recorded["pid"] == os.getpid()
    assert read_run_state(tmp_path)["state"] == "interrupted" and "error" not in read_run_state(tmp_path)
    write_run_state(tmp_path, "running")
    (tmp_path / "run_state.json").write_text('{"state": "running", "pid": 1, "time": 0}')  # another process's
    with pytest.raises(ValueError), recording_end_state(tmp_path):
        raise ValueError("not ours")
    assert read_run_state(tmp_path) == {"state": "running", "pid": 1, "time": 0}  # left alone
    with pytest.raises(ValueError, match="not one of"):
        write_run_state(tmp_path, "half-done")


def test_upload_a_data_file(client, runs_dir):
    body = '{"instruction": "你是谁？", "input": "", "output": "我是甄嬛。"}\n'.encode()
    r = client.post("/api/upload", params={"name": "甄嬛 data.jsonl"}, content=body)
    assert r.status_code == 201 and r.json()["bytes"] == len(body)
    path = Path(r.json()["path"])
    assert path == runs_dir / ".chattune-ui" / "uploads" / "甄嬛 data.jsonl" and path.read_bytes() == body
    again = client.post("/api/upload", params={"name": "甄嬛 data.jsonl"}, content=b"[]")
    assert (
        Path(again.json()["path"]).name == "甄嬛 data-2.jsonl" and path.read_bytes() == body
    )  # never overwritten
    for name in ("../x.json", "/etc/x.json", ".hidden.json", "a.py", "a/b.json", ""):
        r = client.post("/api/upload", params={"name": name}, content=b"[]")
        assert r.status_code == 422 and r.json()["field"] == "name", name
    assert sorted(p.name for p in path.parent.iterdir()) == ["甄嬛 data-2.jsonl", "甄嬛 data.jsonl"]


def test_an_upload_too_large_is_a_413_and_leaves_nothing(client, runs_dir, monkeypatch):
    import chattune.ui.app as app_module

    monkeypatch.setattr(app_module, "MAX_UPLOAD_BYTES", 10)
    r = client.post("/api/upload", params={"name": "big.json"}, content=b"[" + b"1," * 50 + b"1]")
    assert r.status_code == 413 and "path instead" in r.json()["error"]
    assert list((runs_dir / ".chattune-ui" / "uploads").iterdir()) == []


def test_a_run_that_fails_before_training_shows_failed_with_its_log(client, runs_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": \n', encoding="utf-8")
    r = client.post("/api/runs", json={"values": form_values(bad, runs_dir / "bad", max_steps=2)})
    assert r.status_code == 201
    wait_for(lambda: client.get("/api/runs").json()[0]["state"] == "failed", 120, "the failed state")
    seen = _events(client, "bad", lambda s: False)
    assert seen["ended"] == "failed" and "see the log" in seen["overview"]["why"]
    assert f"error: {bad}:2" in seen["log"]  # the CLI's one-line message, naming the file and line
    assert not (runs_dir / "bad").exists()  # nothing half-written
