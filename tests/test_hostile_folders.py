"""Folders, checkpoints and connections from elsewhere (issue 30): tampered adapter and model folders, state.pt
files that load but are wrong, a merge or export killed inside its save, clients that leave mid-request, and
where a relative `train.output_dir` writes. Each ends in one clear line and exit code 2 (or one log line),
before any weight is copied: never a traceback, a hang, a silent success or a half-written output."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chattune.cli.parser import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROW = {"instruction": "你好", "output": "你好，有什么可以帮你？"}


def _clean_line(capsys, *must_contain: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and len(last) < 1200, err
    for text in must_contain:
        assert text in last, (text, last)
    return last


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, qwen_tokenizer, tmp_path_factory) -> Path:
    from test_infer import make_adapter_dir

    return make_adapter_dir(tiny_model_dir, tmp_path_factory.mktemp("hostile") / "adapter", qwen_tokenizer)


def _edit_json(path: Path, **fields) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(fields)
    path.write_text(json.dumps(data), encoding="utf-8")


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_header(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _retensor(path: Path, change) -> None:
    """Rewrite a safetensors file with `change(name, tensor)` applied to its first LoRA tensor."""
    tensors = load_file(str(path))
    first = sorted(k for k in tensors if ".lora_" in k)[0]
    tensors.update(change(first, tensors.pop(first)))
    save_file(tensors, str(path))


def _offsets_past_end(path: Path) -> None:
    header, data = _header(path)
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, len(data) + 4096]
    _write_header(path, header, data)


def _wrong_dtype_size(path: Path) -> None:
    header, data = _header(path)
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [s * 2 for s in header[name]["shape"]]
    _write_header(path, header, data)


W = "adapter_model.safetensors"
# (name, change to the adapter folder, words the one line must hold)
ADAPTERS = [
    ("r-text", lambda d: _edit_json(d / "adapter_config.json", r="abc"), "'r' must be a positive integer"),
    ("r-zero", lambda d: _edit_json(d / "adapter_config.json", r=0), "'r'"),
    ("r-bool", lambda d: _edit_json(d / "adapter_config.json", r=True), "'r'"),
    ("r-huge", lambda d: _edit_json(d / "adapter_config.json", r=10**30), "'r'"),
    ("alpha-text", lambda d: _edit_json(d / "adapter_config.json", lora_alpha="x"), "'lora_alpha'"),
    ("dropout-2", lambda d: _edit_json(d / "adapter_config.json", lora_dropout=2), "'lora_dropout'"),
    ("peft-type-nope", lambda d: _edit_json(d / "adapter_config.json", peft_type="NOPE"), "'peft_type'"),
    ("peft-type-number", lambda d: _edit_json(d / "adapter_config.json", peft_type=5), "'peft_type'"),
    ("targets-number", lambda d: _edit_json(d / "adapter_config.json", target_modules=5), "'target_modules'"),
    ("targets-ints", lambda d: _edit_json(d / "adapter_config.json", target_modules=[1]), "'target_modules'"),
    ("base-number", lambda d: _edit_json(d / "adapter_config.json", base_model_name_or_path=5), "base_model"),
    ("config-list", lambda d: (d / "adapter_config.json").write_text("[1]"), "JSON object"),
    ("config-broken", lambda d: (d / "adapter_config.json").write_text("{"), "cannot read"),
    ("weights-missing", lambda d: (d / W).unlink(), "has no adapter_model.safetensors"),
    (
        "weights-pickle",
        lambda d: ((d / W).unlink(), (d / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n.")),
        "a pickle, is never loaded",
    ),
    ("header-2**62", lambda d: (d / W).write_bytes(struct.pack("<Q", 2**62) + b"{}"), "header claims"),
    ("header-past-end", lambda d: (d / W).write_bytes(struct.pack("<Q", 5000) + b"{}" * 10), "header claims"),
    ("header-not-json", lambda d: (d / W).write_bytes(struct.pack("<Q", 4) + b"{{{{"), "not valid JSON"),
    ("file-3-bytes", lambda d: (d / W).write_bytes(b"abc"), "too short"),
    ("offsets-past-end", lambda d: _offsets_past_end(d / W), "truncated or damaged"),
    ("truncated", lambda d: (d / W).write_bytes((d / W).read_bytes()[:-100]), "truncated or damaged"),
    ("shape-vs-bytes", lambda d: _wrong_dtype_size(d / W), "should take"),
    ("tensor-3d", lambda d: _retensor(d / W, lambda k, t: {k: t[None]}), "LoRA factors are matrices"),
    (
        "tensor-wide",
        lambda d: _retensor(d / W, lambda k, t: {k: torch.zeros(t.shape[0], t.shape[1] + 3)}),
        "does not fit the base model",
    ),
    (
        "tensor-other-module",
        lambda d: _retensor(d / W, lambda k, t: {k.replace("layers.0.", "layers.99."): t}),
        "which the base model does not have",
    ),
    (
        "targets-nothing",
        lambda d: (_edit_json(d / "adapter_config.json", target_modules=["nothing_here"]),),
        "cannot apply the adapter",
    ),
    ("info-base-path-5", lambda d: _edit_json(d / "inference.json", base_model_path=5), "base_model_path"),
    ("info-system-list", lambda d: _edit_json(d / "inference.json", system_prompt=["a"]), "system_prompt"),
    ("info-eot-12", lambda d: _edit_json(d / "inference.json", end_of_turn_token=12), "end_of_turn_token"),
    (
        "template-raises",
        lambda d: (d / "chat_template.jinja").write_text("{{ raise_exception('refused') }}"),
        "chat template",
    ),
    (
        "template-sandbox",
        lambda d: (d / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}"),
        "chat template",
    ),
    (
        "template-huge-range",
        lambda d: (d / "chat_template.jinja").write_text("{% for i in range(10**12) %}x{% endfor %}"),
        "chat template",
    ),
    (
        "template-broken",
        lambda d: (d / "chat_template.jinja").write_text("{% for m in messages %}"),
        "chat template",
    ),
]


@pytest.mark.parametrize("change, reason", [a[1:] for a in ADAPTERS], ids=[a[0] for a in ADAPTERS])
def test_tampered_adapter_folder(adapter, tmp_path, capsys, change, reason):
    folder = shutil.copytree(adapter, tmp_path / "adapter")
    change(folder)
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps(ROW, ensure_ascii=False) + "\n", encoding="utf-8")
    argv = ["predict", str(folder), "--input", str(data), "--output", str(tmp_path / "out.jsonl")]
    assert main([*argv, "--device", "cpu", "--max-new-tokens", "1"]) == 2
    _clean_line(capsys, reason)
    assert not (tmp_path / "out.jsonl").exists()


def _model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


MODELS = [
    ("hidden-size", lambda d: _edit_json(d / "config.json", hidden_size=48), "different models"),
    ("intermediate-size", lambda d: _edit_json(d / "config.json", intermediate_size=100), "different models"),
    (
        "truncated",
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:999]),
        "model.safetensors",
    ),
    (
        "header-2**62",
        lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", 2**62)),
        "header claims",
    ),
]


@pytest.mark.parametrize("change, reason", [m[1:] for m in MODELS], ids=[f"model-{m[0]}" for m in MODELS])
@pytest.mark.parametrize("command", ["predict", "merge-of-adapter"])
def test_tampered_model_folder(tiny_model_dir, adapter, tmp_path, capsys, command, change, reason):
    model = _model_copy(tiny_model_dir, tmp_path)
    change(model)
    if command == "predict":
        data = tmp_path / "in.jsonl"
        data.write_text(json.dumps(ROW, ensure_ascii=False) + "\n", encoding="utf-8")
        argv = [
            "predict",
            str(model),
            "--input",
            str(data),
            "--output",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ]
    else:  # an adapter whose base is the damaged folder
        folder = shutil.copytree(adapter, tmp_path / "adapter")
        _edit_json(folder / "inference.json", base_model_path=str(model))
        argv = ["merge", str(folder), "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    _clean_line(capsys, reason)
    assert not (tmp_path / "out").exists()


# -- merge and export: a killed save's temporaries, outputs that cannot be -----------------------------------------
def test_merge_under_a_file_is_refused(adapter, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["merge", str(adapter), "--output", str(tmp_path / "file" / "sub")]) == 2
    _clean_line(capsys, "is a file")


def test_merge_removes_what_a_killed_merge_left(adapter, tmp_path, capsys):
    stale = tmp_path / ".merged-k1ll3d"  # what files.atomic_path names its temporary folder
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    assert main(["merge", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    assert "removed" in capsys.readouterr().err and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_export_removes_what_a_killed_export_left(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("gguf")
    stale = tmp_path / ".m.gguf-k1ll3d.tmp"
    stale.write_bytes(b"\0" * 1000)
    out = tmp_path / "m.gguf"
    assert main(["export", str(tiny_model_dir), "--format", "gguf", "--output", str(out)]) == 0
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "m.gguf"]


# -- checkpoints: state.pt that loads, but is not what chattune wrote -----------------------------------------------
def _tree(model_dir: Path, data: Path, out: Path, max_steps: int) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_path": str(data), "max_len": 64},
        "train": {"output_dir": str(out), "max_steps": max_steps, "save_steps": 2, "progress": False},
        "eval": {"samples": 0, "loss": False},
    }


@pytest.fixture(scope="module")
def checkpointed(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A run of 3 steps with its checkpoint at step 2 (and the data it trained on)."""
    from chattune.config.load import config_from_dict
    from chattune.train.job import run

    root = tmp_path_factory.mktemp("ckpt")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(ROW, ensure_ascii=False) + "\n" for _ in range(8)), encoding="utf-8")
    run(config_from_dict(_tree(tiny_model_dir, data, root / "run", 3)))
    assert (root / "run" / "checkpoints" / "step-0000002" / "state.pt").is_file()
    return root / "run", data


def _state(change):
    def edit(run: Path) -> None:
        path = run / "checkpoints" / "step-0000002" / "state.pt"
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)

    return edit


def _moment_shape(state: dict) -> None:
    moments = next(iter(state["optimizer"]["state"].values()))
    moments["exp_avg"] = torch.zeros(3, 3)


def _adapter_shape(run: Path) -> None:
    path = run / "checkpoints" / "step-0000002" / "adapter" / W
    _retensor(path, lambda k, t: {k: torch.zeros(t.shape[0] + 1, t.shape[1])})


def _rename(run: Path) -> None:
    ckpts = run / "checkpoints"
    (ckpts / "step-0000002").rename(ckpts / "step-0000001")


CHECKPOINTS = [
    ("step-text", _state(lambda s: s.update(step="abc")), "not a step number"),
    ("step-negative", _state(lambda s: s.update(step=-5)), "not a step number"),
    ("step-bool", _state(lambda s: s.update(step=True)), "not a step number"),
    ("step-vs-folder", _state(lambda s: s.update(step=7)), "but its folder is named step-0000002"),
    ("folder-renamed", _rename, "but its folder is named step-0000001"),
    ("optimizer-empty", _state(lambda s: s.update(optimizer={})), "not an optimizer's state_dict"),
    ("optimizer-groups", _state(lambda s: s["optimizer"].update(param_groups=[1])), "param_groups"),
    ("config-text", _state(lambda s: s.update(config="x")), "config is a str"),
    ("scheduler-list", _state(lambda s: s.update(scheduler=[1])), "scheduler is a list"),
    ("rng-text", _state(lambda s: s.update(rng="x")), "rng is not a list"),
    (
        "rng-garbage",
        _state(lambda s: s["rng"][0].update(torch=torch.zeros(3, dtype=torch.uint8))),
        "generator",
    ),
    ("rng-python", _state(lambda s: s["rng"][0].update(python=(1, 2))), "generator state is damaged"),
    ("moment-shape", _state(_moment_shape), "optimizer state for other parameters"),
    ("adapter-shape", _adapter_shape, "does not fit this model"),
]


@pytest.mark.parametrize("change, reason", [c[1:] for c in CHECKPOINTS], ids=[c[0] for c in CHECKPOINTS])
def test_checkpoint_that_loads_but_is_wrong(checkpointed, tiny_model_dir, tmp_path, capsys, change, reason):
    import yaml

    run, data = checkpointed
    out = shutil.copytree(run, tmp_path / "run")
    (out / "summary.json").unlink()
    change(out)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_tree(tiny_model_dir, data, out, 4)), encoding="utf-8")
    assert main(["train", str(cfg), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: "), err
    assert reason in err, err
    assert not list(out.glob(".*")) and not list((out / "checkpoints").glob(".*"))  # no temporary left


# -- serve: a client that leaves is one log line, not a traceback ---------------------------------------------------
@pytest.fixture(scope="module")
def server(adapter):
    from test_serve import serving

    from chattune.infer.load import load_for_inference
    from chattune.infer.serve import build_app

    with serving(build_app(load_for_inference(adapter, device="cpu"), default_max_tokens=2)) as url:
        yield url


HEAD = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
LEAVERS = [
    ("lying-content-length", (HEAD + "Content-Length: 5000\r\n\r\n" + '{"messages": [').encode()),
    ("headers-only", (HEAD + "Content-Length: 100\r\n\r\n").encode()),
    ("bad-chunk", (HEAD + "Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n").encode()),
    ("chunk-cut", (HEAD + 'Transfer-Encoding: chunked\r\n\r\n100\r\n{"mess').encode()),
    ("slow-loris", (HEAD + "Content-Length: 50\r\n\r\n{").encode()),
]


@pytest.mark.parametrize("raw", [x[1] for x in LEAVERS], ids=[x[0] for x in LEAVERS])
def test_a_client_that_leaves_is_one_log_line(server, caplog, raw):
    from test_serve import _post

    host, port = server.removeprefix("http://").split(":")
    caplog.set_level(logging.INFO)
    for _ in range(5):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(raw)
            time.sleep(0.05)
    time.sleep(0.3)
    status, _ = _post(f"{server}/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}')
    assert status == 200  # still serving
    records = [r for r in caplog.records if r.name.startswith(("chattune", "uvicorn"))]
    assert not [r for r in records if r.exc_info or "internal error" in r.getMessage()], records
    for name in ("chattune", "uvicorn"):  # uvicorn's own one-line warning for a malformed request, at most
        said = [r.getMessage() for r in records if r.name.startswith(name)]
        assert len(said) <= 5 and all("\n" not in m for m in said), said


# -- where a relative train.output_dir writes, and that the run says so ---------------------------------------------
def test_relative_output_dir_is_relative_to_the_working_directory(tmp_path, capsys, monkeypatch):
    import yaml

    (tmp_path / "configs").mkdir()
    data = tmp_path / "configs" / "train.jsonl"
    data.write_text("".join(json.dumps(ROW, ensure_ascii=False) + "\n" for _ in range(4)), encoding="utf-8")
    tree = _tree(Path("builtin:tiny-qwen2"), Path("train.jsonl"), Path("runs/rel"), 1)
    tree["model"]["name_or_path"] = "builtin:tiny-qwen2"
    tree["train"].update(save_steps=None, device="cpu")
    (tmp_path / "configs" / "c.yaml").write_text(yaml.safe_dump(tree), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "configs/c.yaml"]) == 0  # data.train_path: relative to the config; output: to here
    assert (tmp_path / "runs" / "rel" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "configs" / "runs").exists()
    assert f"writing the run to {tmp_path / 'runs' / 'rel'}" in capsys.readouterr().err
