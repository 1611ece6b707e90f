"""A corpus of broken inputs, as a careless user or an attacker would give them: config files, data files,
command-line arguments and HTTP requests. Each must end in one readable line naming the key, file and
line or argument at fault with exit code 2 (or a 4xx in OpenAI's error shape), never a traceback, a 500,
a half-written output or a silent success."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from chattune.cli.parser import main

GOOD_ROW = {"instruction": "你好", "output": "你好，有什么可以帮你？"}


def _data_file(tmp_path: Path, rows: int = 4) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text(
        "".join(json.dumps(GOOD_ROW, ensure_ascii=False) + "\n" for _ in range(rows)), encoding="utf-8"
    )
    return path


def _config(tmp_path: Path, extra: str = "", data: Path | None = None) -> Path:
    """A valid training config (built-in tiny model, the given data) with `extra` YAML merged over it."""
    tree = {
        "model": {"name_or_path": "builtin:tiny-qwen2"},
        "data": {"train_path": str(data or _data_file(tmp_path)), "max_len": 64, "system_prompt": "你是助手"},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "device": "cpu", "progress": False},
        "eval": {"samples": 0},
    }
    for section, values in (yaml.safe_load(extra) or {}).items():
        tree.setdefault(section, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _tokenizer_read_once(monkeypatch):
    """`train` reads the 151k-token tokenizer (~1 s) before it reads the data: read it once here."""
    import chattune.train.job

    real = chattune.train.job.load_tokenizer
    cache = _TOKENIZERS

    def cached(model_dir, cfg):
        key = (str(model_dir), cfg.chat_template)
        if key not in cache:
            cache[key] = real(model_dir, cfg)
        return cache[key]

    monkeypatch.setattr(chattune.train.job, "load_tokenizer", cached)


_TOKENIZERS: dict = {}


def _one_clean_line(capsys, *must_contain: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    for text in must_contain:
        assert text in last, (text, last)
    return last


# -- config files: refused at load, before the model is read; no run directory appears -------------------
CONFIGS = [
    ("train:\n  lr: .nan\n", "train.lr"),
    ("train:\n  lr: .inf\n", "train.lr"),
    ("train:\n  lr: -1.0e-4\n", "train.lr"),
    ("train:\n  lr: 0\n", "train.lr"),
    ("train:\n  lr: fast\n", "train.lr"),
    ("train:\n  epochs: .inf\n  max_steps: null\n", "train.epochs"),
    ("train:\n  epochs: 0\n  max_steps: null\n", "train.epochs"),
    ("train:\n  warmup_ratio: 1.5\n", "train.warmup_ratio"),
    ("train:\n  warmup_ratio: .nan\n", "train.warmup_ratio"),
    ("train:\n  weight_decay: -0.01\n", "train.weight_decay"),
    ("train:\n  max_grad_norm: 0\n", "train.max_grad_norm"),
    ("train:\n  max_grad_norm: -.inf\n", "train.max_grad_norm"),
    ("train:\n  micro_batch_size: 0\n", "train.micro_batch_size"),
    ("train:\n  micro_batch_size: 2.5\n", "train.micro_batch_size"),
    ("train:\n  grad_accum_steps: -1\n", "train.grad_accum_steps"),
    ("train:\n  max_steps: 0\n", "train.max_steps"),
    ("train:\n  save_steps: -5\n", "train.save_steps"),
    ("train:\n  seed: -1\n", "train.seed"),
    ("train:\n  seed: 99999999999999999999999\n", "train.seed"),
    ("train:\n  packing: true\n  pack_tokens: 16\n", "train.pack_tokens"),
    ("train:\n  lrr: 1\n", "train.lrr"),
    ("trian:\n  lr: 1\n", "trian"),
    ("train:\n  device: tpu\n", "train.device"),
    ("lora:\n  dropout: .nan\n", "lora.dropout"),
    ("lora:\n  r: 0\n", "lora.r"),
    ("lora:\n  alpha: 1.5\n", "lora.alpha"),
    ("lora:\n  target_modules: 3\n", "lora.target_modules"),
    ("data:\n  max_len: 0\n", "data.max_len"),
    ("data:\n  eval_ratio: 1\n", "data.eval_ratio"),
    ("data:\n  eval_ratio: .nan\n", "data.eval_ratio"),
    ("data:\n  truncation: middle\n", "data.truncation"),
    ("data:\n  format: xml\n", "data.format"),
    ("data:\n  train_samples: [0]\n", "data.train_samples"),
    ("data:\n  train_samples: [1, 2]\n", "data.train_samples"),
    ("data:\n  converter: identity\n", "data.identity_name"),
    ("model:\n  dtype: float8\n", "model.dtype"),
    ("eval:\n  samples: -1\n", "eval.samples"),
    ("eval:\n  max_eval_examples: 0\n", "eval.max_eval_examples"),
    ("eval:\n  metrics: [nope]\n", "eval.metrics[0]"),
    ("track:\n  backend: comet\n", "track.backend"),
    ("track:\n  backend: swanlab\n  project: 法律问答微调\n", "track.project"),
    ("track:\n  backend: swanlab\n  project: my project\n", "track.project"),
    ("track:\n  backend: swanlab\n  experiment: ''\n", "track.experiment"),
    ("track:\n  required: maybe\n", "track.required"),
    # issue 30: counts past int64, ranks past any model, non-finite numbers written every YAML way
    ("lora:\n  r: 1000000000000000000000000000000\n", "lora.r"),
    ("lora:\n  r: 100000\n", "lora.r"),
    ("lora:\n  r: -9223372036854775809\n", "lora.r"),
    ("data:\n  max_len: 100000000000000000000\n", "data.max_len"),
    ("train:\n  micro_batch_size: 18446744073709551616\n", "train.micro_batch_size"),
    ("train:\n  grad_accum_steps: 1e400\n", "train.grad_accum_steps"),
    ("lora:\n  alpha: 1e400\n", "lora.alpha"),
    ("lora:\n  alpha: .NaN\n", "lora.alpha"),
    ("train:\n  lr: -.Inf\n", "train.lr"),
    ("train:\n  lr: 1e999\n", "train.lr"),
    ("train:\n  weight_decay: .nan\n", "train.weight_decay"),
    ("eval:\n  max_new_tokens: 99999999999999999999999\n", "eval.max_new_tokens"),
]


@pytest.mark.parametrize("extra, key", CONFIGS, ids=[f"config-{k}-{i}" for i, (_, k) in enumerate(CONFIGS)])
def test_broken_config(tmp_path, capsys, extra, key):
    cfg = _config(tmp_path, extra)
    assert main(["train", str(cfg)]) == 2
    _one_clean_line(capsys, f"config key '{key}'", str(cfg))
    assert not (tmp_path / "run").exists()


def _bomb(levels: int, tail: str) -> bytes:
    """The billion-laughs shape: level k is a list of ten aliases to level k-1 (10**levels values)."""
    lines = ["l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 10)}]" for k in range(1, levels)]
    return ("x:\n" + "".join(f"  {line}\n" for line in lines) + tail).encode()


def _inline_bomb(levels: int) -> bytes:
    """`lora.r` as the same shape, anchors defined inside the value itself."""
    items = ["&l0 [" + ", ".join(["1"] * 10) + "]"]
    items += [f"&l{k} [{', '.join([f'*l{k - 1}'] * 10)}]" for k in range(1, levels)]
    return f"lora:\n  r: [{', '.join(items)}]\n".encode()


def _write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


CONFIG_FILES = [
    ("missing", None, "no such config file"),
    (
        "not-yaml",
        b"train: [\n",
        "not valid YAML: expected the node content, but found '<stream end>' (line 2",
    ),
    ("a-list", b"- train\n- data\n", "mapping of sections"),
    ("deep", b"train: " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "(file)"),
    ("not-utf8", b"train:\n  lr: \xff\xfe\n", "UTF-8"),
    ("section-not-mapping", b"train: 3\n", "config key 'train'"),
    # issue 30: alias bombs answer at once (the expanded size is counted before anything is built)
    ("alias-bomb-lora.r", _bomb(9, "lora:\n  r: *l8\n"), "aliases expand to more than"),
    ("alias-bomb-lr", _bomb(7, "train:\n  lr: *l6\n"), "aliases expand to more than"),
    ("alias-bomb-section", _bomb(8, "train: *l7\n"), "aliases expand to more than"),
    ("alias-bomb-key", _bomb(8, "data:\n  system_prompt: {x: *l7}\n"), "aliases expand to more than"),
    ("alias-small-bomb", _inline_bomb(4), "config key 'lora.r'"),  # 10**4 values: a bounded message
    ("alias-to-itself", b"lora:\n  r: &a [*a]\n", "refers to a value that contains it"),
    # issue 30: a key given twice is refused, naming both lines
    ("duplicate-lr", b"train:\n  lr: 1.0e-4\n  lr: 2.0e-4\n", "key 'lr' is given twice (lines 2 and 3)"),
    (
        "duplicate-section",
        b"train:\n  max_steps: 5\nlora:\n  r: 4\ntrain:\n  lr: 1.0\n",
        "'train' is given twice",
    ),
    ("duplicate-model", b"model:\n  name_or_path: a\nmodel:\n  name_or_path: b\n", "'model' is given twice"),
    ("duplicate-nested", b"data:\n  columns:\n    prompt: q\n    prompt: r\n", "'prompt' is given twice"),
    ("duplicate-flow", b"lora: {r: 4, r: 8}\n", "'r' is given twice"),
    ("duplicate-quoted", b"train:\n  lr: 1.0\n  'lr': 2.0\n", "'lr' is given twice"),
]


@pytest.mark.parametrize(
    "name, content, reason", CONFIG_FILES, ids=[f"config-file-{c[0]}" for c in CONFIG_FILES]
)
def test_broken_config_file(tmp_path, capsys, name, content, reason):
    path = tmp_path / "c.yaml" if content is None else _write(tmp_path, "c.yaml", content)
    assert main(["train", str(path)]) == 2
    assert len(_one_clean_line(capsys, reason, str(path))) < 600  # what a message prints is bounded


def test_output_dir_that_is_a_file_or_under_one(tmp_path, capsys):
    blocker = tmp_path / "run"
    blocker.write_text("not a directory")
    for target in (blocker, blocker / "sub"):
        assert main(["train", str(_config(tmp_path, f"train:\n  output_dir: {target}\n"))]) == 2
        _one_clean_line(capsys, "train.output_dir", "is a file")
    assert blocker.read_text() == "not a directory"


OVERRIDES = [
    (["train.lr"], "section.key=value"),
    (["train.lr=nan"], "train.lr"),
    (["train.lr=.inf"], "train.lr"),
    (["nope.key=1"], "nope"),
    (["train.lr.x=1"], "train.lr"),
    (["lora.r=[1, 2]"], "lora.r"),
    (["track.project=中文项目", "track.backend=swanlab"], "track.project"),
    (["lora.r=100000000000000000000000000000"], "lora.r"),
    (["lora.r=99999"], "lora.r"),
    (["train.lr=-inf"], "train.lr"),
    (["train.lr=1e999"], "train.lr"),
    (["lora.r={a: 1, a: 2}"], "lora.r"),
    (["lora.r=&a [*a, *a]"], "lora.r"),
]


@pytest.mark.parametrize("overrides, key", OVERRIDES, ids=[f"override-{i}" for i in range(len(OVERRIDES))])
def test_broken_override(tmp_path, capsys, overrides, key):
    assert main(["train", str(_config(tmp_path)), *overrides]) == 2
    _one_clean_line(capsys, key)
    assert not (tmp_path / "run").exists()


# -- data files: the first bad row stops the run naming file and line, before any output -------------------
def _rows(*rows) -> bytes:
    return "".join(
        (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows
    ).encode()


G = json.dumps(GOOD_ROW, ensure_ascii=False)
DATA = [
    ("malformed.jsonl", _rows(G, '{"instruction": "q", "output": '), 2, "malformed JSON"),
    ("array-row.jsonl", _rows(G, "[1, 2]"), 2, "JSON object"),
    ("string-row.jsonl", _rows(G, '"just text"'), 2, "JSON object"),
    ("no-output.jsonl", _rows(G, {"instruction": "q"}), 2, "missing field 'output'"),
    ("output-list.jsonl", _rows(G, {"instruction": "q", "output": ["a"]}), 2, "must be a string"),
    ("empty-answer.jsonl", _rows(G, {"instruction": "q", "output": ""}), 2, "empty assistant answer"),
    ("blank-answer.jsonl", _rows(G, {"instruction": "q", "output": " \n\t"}), 2, "empty assistant answer"),
    ("empty-question.jsonl", _rows(G, {"instruction": "", "input": "", "output": "a"}), 2, "empty user turn"),
    ("only-system.jsonl", _rows(G, {"messages": [{"role": "system", "content": "s"}]}), 2, "only a system"),
    (
        "role-order.jsonl",
        _rows(G, {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}),
        2,
        "alternate",
    ),
    ("unknown-role.jsonl", _rows(G, {"messages": [{"role": "bot", "content": "a"}]}), 2, "unknown role"),
    ("content-int.jsonl", _rows(G, {"messages": [{"role": "user", "content": 3}]}), 2, "must be a string"),
    ("messages-dict.jsonl", _rows(G, {"messages": {"role": "user"}}), 2, "list of turns"),
    (
        "ends-with-user.jsonl",
        _rows(G, {"messages": [{"role": "user", "content": "q"}]}),
        2,
        "assistant answer",
    ),
    (
        "bad-history.jsonl",
        _rows(G, {"instruction": "q", "output": "a", "history": [["only one"]]}),
        2,
        "history[0]",
    ),
    ("unknown-shape.jsonl", _rows(G, {"question": "q", "answer": "a"}), 2, "unknown record shape"),
    (
        "deep.jsonl",
        _rows(G, '{"instruction": "q", "output": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        2,
        "nested",
    ),
    ("not-utf8.jsonl", _rows(G) + b'{"instruction": "\xff", "output": "a"}\n', 2, "UTF-8"),
    (
        "broken-array.json",
        b'[\n{"instruction": "q", "output": "a"},\n{"instruction": \n]',
        4,  # where the parser found the damage
        "malformed JSON",
    ),
    ("array-of-numbers.json", b"[\n1,\n2\n]", 2, "JSON object"),
    ("cells.csv", b"instruction,output\nq,a\nq,a,extra\n", 3, "cells"),
    # issue 30: a role that is a list or an object; lone surrogates (legal JSON, no text)
    (
        "role-list.jsonl",
        _rows(G, {"messages": [{"role": ["user"], "content": "q"}]}),
        2,
        "unknown role a list",
    ),
    (
        "role-object.jsonl",
        _rows(G, {"messages": [{"role": {"a": 1}, "content": "q"}]}),
        2,
        "unknown role a dict",
    ),
    ("from-list.jsonl", _rows(G, {"conversations": [{"from": ["human"], "value": "q"}]}), 2, "unknown role"),
    ("from-object.jsonl", _rows(G, {"conversations": [{"from": {}, "value": "q"}]}), 2, "unknown role"),
    (
        "role-list-later.json",
        b"[\n" + G.encode() + b',\n{"messages": [{"role": [], "content": "q"}]}\n]',
        3,
        "unknown role",
    ),
    (
        "surrogate-output.jsonl",
        _rows(G, '{"instruction": "q", "output": "\\ud800"}'),
        2,
        "lone UTF-16 surrogate",
    ),
    ("surrogate-instruction.jsonl", _rows(G, '{"instruction": "\\udfff x", "output": "a"}'), 2, "surrogate"),
    (
        "surrogate-system.jsonl",
        _rows(G, '{"instruction": "q", "output": "a", "system": "\\udc80"}'),
        2,
        "surrogate",
    ),
    (
        "surrogate-messages.jsonl",
        _rows(
            G,
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\\ud83d"}]}',
        ),
        2,
        "surrogate",
    ),
    (
        "surrogate-sharegpt.jsonl",
        _rows(G, '{"conversations": [{"from": "human", "value": "\\ud800"}, {"from": "gpt", "value": "a"}]}'),
        2,
        "surrogate",
    ),
    (
        "long-prompt.jsonl",
        _rows(G, {"instruction": "很长的问题" * 200, "output": "答"}),
        2,
        "no answer token",
    ),
]


@pytest.mark.parametrize("name, content, line, reason", DATA, ids=[f"data-{d[0]}" for d in DATA])
def test_broken_data_file(tmp_path, capsys, name, content, line, reason):
    data = _write(tmp_path, name, content)
    assert main(["train", str(_config(tmp_path, data=data))]) == 2
    _one_clean_line(capsys, f"{data}:{line}: ", reason)
    assert not (tmp_path / "run").exists()


SOURCES = [
    ("missing", "file not found"),
    ("notes.txt", "unsupported file type"),
    ("empty.jsonl", "no usable records: the source is empty"),
    ("a-directory", "not a dataset"),
    ("every-row-dropped", "no example left to train on"),
]


@pytest.mark.parametrize("kind, reason", SOURCES, ids=[f"source-{s[0]}" for s in SOURCES])
def test_broken_data_source(tmp_path, capsys, kind, reason):
    extra = ""
    if kind == "missing":
        data = tmp_path / "missing.jsonl"
    elif kind == "a-directory":
        data = tmp_path / "a-directory"
        data.mkdir()
    elif kind == "every-row-dropped":
        data = _write(tmp_path, "long.jsonl", _rows({"instruction": "长" * 300, "output": "答" * 300}))
        extra = "data:\n  truncation: drop\n"
    else:
        data = _write(tmp_path, kind, b"" if kind.endswith(".jsonl") else b"hello\n")
    assert main(["train", str(_config(tmp_path, extra, data=data))]) == 2
    _one_clean_line(capsys, str(data), reason)
    assert not (tmp_path / "run").exists()


# -- command-line arguments ---------------------------------------------------------------------------------
CLI = [
    ([], None),
    (["train"], None),
    (["serve"], None),
    (["serve", "x", "--port", "abc"], None),
    (["serve", "x", "--port", "70000"], "--port"),
    (["serve", "x", "--max-queue", "0"], None),  # counts: argparse refuses them, before any model loads
    (["serve", "x", "--max-batch", "-1"], None),
    (["predict", "x", "--input", "i", "--output", "o", "--batch-size", "0"], None),
    (["predict", "x", "--input", "i", "--output", "o", "--max-new-tokens", "-4"], None),
    (["data", "preview", "c.yaml", "-n", "-2"], None),
    (["serve", "x", "--max-body-mb", "0"], "--max-body-mb"),
    (["serve", "{tmp}/missing"], "does not exist"),
    (["chat", "{tmp}/missing"], "does not exist"),
    (
        ["predict", "{tmp}/missing", "--input", "{tmp}/in.jsonl", "--output", "{tmp}/out.jsonl"],
        "does not exist",
    ),
    (["eval", "{tmp}/missing", "--data", "{tmp}/in.jsonl"], "does not exist"),
    (["merge", "{tmp}/missing", "--output", "{tmp}/merged"], "does not exist"),
    (["report", "{tmp}/missing"], "missing"),
    (["data", "check", "{tmp}/missing.yaml"], "no such config file"),
    (["data", "convert", "{tmp}/missing.json", "{tmp}/out.jsonl"], "file not found"),
    (["data", "convert", "{tmp}/in.jsonl", "{tmp}/out.jsonl", "--converter", "identity"], "--name"),
    (["demo", "--output-dir", "{tmp}/out", "train.lr=.nan"], "train.lr"),
    # issue 30: non-finite numbers from the command line (argparse refuses them, naming the flag)
    (["chat", "x", "--temperature", "nan"], None),
    (["chat", "x", "--temperature", "inf"], None),
    (["chat", "x", "--temperature", "-1"], None),
    (["predict", "x", "--input", "i", "--output", "o", "--temperature", "NaN"], None),
    (["predict", "x", "--input", "i", "--output", "o", "--temperature", "Infinity"], None),
    (["predict", "x", "--input", "i", "--output", "o", "--temperature=-inf"], None),
    (["serve", "x", "--max-body-mb", "inf"], None),
    (["serve", "x", "--max-body-mb", "nan"], None),
    (["serve", "x", "--max-body-mb=-inf"], None),
    (["serve", "x", "--max-body-mb", "1e400"], None),
    # issue 30: an output that is the input
    (["predict", "{tmp}/missing", "--input", "{tmp}/in.jsonl", "--output", "{tmp}/in.jsonl"], "is the input"),
    (
        ["predict", "{tmp}/missing", "--input", "{tmp}/in.jsonl", "--output", "{tmp}/./x/../in.jsonl"],
        "is the input",
    ),
    (["data", "convert", "{tmp}/in.jsonl", "{tmp}/in.jsonl"], "is the input"),
    (["data", "convert", "{tmp}/in.jsonl", "{tmp}/sub/../in.jsonl"], "is the input"),
]


@pytest.mark.parametrize(
    "argv, reason", CLI, ids=[f"cli-{' '.join(a[:2]) or 'none'}-{i}" for i, (a, _) in enumerate(CLI)]
)
def test_broken_command_line(tmp_path, capsys, argv, reason):
    _data_file(tmp_path).rename(tmp_path / "in.jsonl")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if reason is None:  # argparse's own refusal: usage and one error line, exit code 2
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "error:" in err
        if any(a.startswith(("--temperature", "--max-body-mb")) for a in argv):
            assert "finite number" in err, err
        if any(a in ("--max-queue", "--max-batch", "--batch-size", "--max-new-tokens", "-n") for a in argv):
            assert "must be at least 1" in err and f"usage: chattune {argv[0]}" in err, err
    else:
        before = (tmp_path / "in.jsonl").read_bytes()
        assert main(argv) == 2
        _one_clean_line(capsys, reason)
        assert (tmp_path / "in.jsonl").read_bytes() == before  # the input is never written
    assert not any((tmp_path / name).exists() for name in ("out.jsonl", "merged", "out"))


def test_a_port_in_use_is_said_before_anything_loads(tmp_path, capsys):
    """`serve` and `ui` name --port at once (serve used to load the model first, then print uvicorn's errno)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for argv in (["serve", "builtin:smollm2-135m-instruct", "--port", port], ["ui", "--port", port]):
            assert main([*argv, *(["--runs-dir", str(tmp_path)] if argv[0] == "ui" else [])]) == 2
            _one_clean_line(capsys, f"--port {port}")


# -- HTTP requests: 4xx with a short message in OpenAI's shape, never a 500 ----------------------------------
@pytest.fixture(scope="module")
def server(tiny_model_dir, qwen_tokenizer, tmp_path_factory, one_torch_thread):
    from test_infer import make_adapter_dir
    from test_serve import serving

    from chattune.infer.load import load_for_inference
    from chattune.infer.serve import build_app

    adapter = make_adapter_dir(tiny_model_dir, tmp_path_factory.mktemp("broken") / "adapter", qwen_tokenizer)
    with serving(build_app(load_for_inference(adapter, device="cpu"), default_max_tokens=2)) as url:
        yield url


HELLO = [{"role": "user", "content": "hi"}]


def _j(**fields) -> bytes:
    return json.dumps({"messages": HELLO, "max_tokens": 2, **fields}).encode()


REQUESTS = [
    ("seed-2**64", _j(seed=2**64), 400, "seed"),
    ("seed-negative", _j(seed=-(2**70)), 400, "seed"),
    ("seed-float", _j(seed=1.5), 400, "seed"),
    ("seed-text", _j(seed="x"), 400, "seed"),
    ("n-0", _j(n=0), 400, "n"),
    ("n-9", _j(n=9), 400, "n"),
    ("n-text", _j(n="two"), 400, "n"),
    ("max_tokens-0", _j(max_tokens=0), 400, "max_tokens"),
    ("max_tokens-negative", _j(max_tokens=-5), 400, "max_tokens"),
    ("max_tokens-1e30", _j(max_tokens=10**30), 400, "max_tokens"),
    ("max_tokens-past-context", _j(max_tokens=100_000), 400, "messages"),
    ("max_completion_tokens-0", _j(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("temperature-negative", _j(temperature=-0.5), 400, "temperature"),
    ("temperature-3", _j(temperature=3), 400, "temperature"),
    (
        "temperature-NaN",
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        400,
        "temperature",
    ),
    ("top_p-0", _j(top_p=0), 400, "top_p"),
    ("top_p-Infinity", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', 400, "top_p"),
    ("messages-missing", b'{"max_tokens": 2}', 400, "messages"),
    ("messages-text", _j(messages="hi"), 400, "messages"),
    ("messages-empty", _j(messages=[]), 400, "messages"),
    ("role-robot", _j(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role"),
    ("role-missing", _j(messages=[{"content": "hi"}]), 400, "messages[0].role"),
    ("content-number", _j(messages=[{"role": "user", "content": 42}]), 400, "messages[0].content"),
    ("content-image", _j(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, "messages"),
    ("content-part-text", _j(messages=[{"role": "user", "content": ["hi"]}]), 400, "messages[0].content"),
    ("stop-17", _j(stop=["x"] * 17), 400, "stop"),
    ("stop-number", _j(stop=5), 400, "stop"),
    ("stream-n-2", _j(stream=True, n=2), 400, "n"),
    ("stream_options-text", _j(stream_options="yes"), 400, "stream_options"),
    ("tools", _j(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("logprobs", _j(logprobs=True), 400, "logprobs"),
    ("model-unknown", _j(model="gpt-4o"), 404, "model"),
    ("model-number", _j(model=123), 400, "model"),
    ("not-json", b'{"messages": [', 400, None),
    ("json-array", b"[1, 2]", 400, None),
    ("json-string", b'"hi"', 400, None),
    ("empty-body", b"", 400, None),
    ("nested-deep", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    ("not-utf8", b'{"messages": "\xff\xfe"}', 400, None),
    ("int-5000-digits", b'{"messages": [], "seed": ' + b"9" * 5000 + b"}", 400, None),
    # issue 30: lone surrogates, wherever text enters (legal JSON escapes; no tokenizer can encode them)
    (
        "surrogate-user",
        b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
        400,
        "messages[0].content",
    ),
    (
        "surrogate-system",
        b'{"messages": [{"role": "system", "content": "\\udfff"}, {"role": "user", "content": "hi"}]}',
        400,
        "messages[0].content",
    ),
    (
        "surrogate-model",
        b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
        400,
        "model",
    ),
    (
        "surrogate-stop",
        b'{"stop": ["\\udc00"], "messages": [{"role": "user", "content": "hi"}]}',
        400,
        "stop[0]",
    ),
    (
        "surrogate-part",
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
        400,
        "messages[0].content[0].text",
    ),
    ("surrogate-key", b'{"\\ud800": 1, "messages": [{"role": "user", "content": "hi"}]}', 400, "request"),
    ("surrogate-role", b'{"messages": [{"role": "\\ud800", "content": "hi"}]}', 400, "messages[0].role"),
]


@pytest.mark.parametrize(
    "body, status, param", [r[1:] for r in REQUESTS], ids=[f"http-{r[0]}" for r in REQUESTS]
)
def test_broken_request(server, body, status, param):
    from test_serve import _post

    got, err = _post(f"{server}/v1/chat/completions", body, key=None)
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and len(err["error"]["message"]) < 400
    if param is not None:
        assert (err["error"]["param"] or "").startswith(param), err


def test_wrong_methods_and_paths(server):
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for url, data, status in [
        (f"{server}/v1/chat/completions", None, 405),  # GET
        (f"{server}/v1/nothing", b"{}", 404),
        (f"{server}/health", b"{}", 405),
    ]:
        with pytest.raises(urllib.error.HTTPError) as e:
            opener.open(urllib.request.Request(url, data=data), timeout=30)
        assert e.value.code == status and "error" in json.loads(e.value.read())


def test_the_corpus_has_at_least_80_inputs():
    count = len(CONFIGS) + len(CONFIG_FILES) + 1 + len(OVERRIDES) + len(DATA) + len(SOURCES) + len(CLI)
    count += len(REQUESTS) + 3
    assert count >= 80 + 66, count  # 66 added for issue 30 (and test_hostile_folders.py's folders)
