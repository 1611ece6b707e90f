"""Data-parallel training on CPU: two gloo processes started by torchrun learn exactly what one process
learns from the same global batch, and only rank 0 writes (one run directory, one report, one adapter)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from chattune.config.load import config_from_dict
from chattune.config.schema import TrainConfig
from chattune.errors import ChattuneError, ConfigError
from chattune.train.job import run
from chattune.train.strategies import OneProcess, Replicas, Shards, build_strategy, strategy_for
from chattune.train.world import World, check_launch, loopback_env, read_world, share_window, torchrun_command

REPO = Path(__file__).resolve().parents[1]
HUANHUAN = REPO / "data" / "huanhuan" / "huanhuan.json"
# fp32 on CPU: the two runs differ only in the order gradients are summed (rank 0's micro-batches, then
# rank 1's) and in OpenMP threads, which moves a per-token loss by about 1e-7 relative.
REL_TOL = 1e-5


# -- pure parts ---------------------------------------------------------------------------------------------
def test_read_world_from_the_launcher_environment():
    assert read_world({}) == World(rank=0, size=1, local_rank=0)
    w = read_world({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (w.rank, w.size, w.local_rank, w.is_main) == (3, 4, 1, False)
    with pytest.raises(ChattuneError, match="WORLD_SIZE"):
        read_world({"WORLD_SIZE": "two"})
    with pytest.raises(ChattuneError, match="RANK=2, WORLD_SIZE=2"):
        read_world({"RANK": "2", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("n_micro", [1, 3, 4, 7])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_ranks_share_a_step_disjointly_and_completely(n_micro, size):
    window = [[i, i + 100] for i in range(n_micro)]
    shares = [share_window(window, World(rank=r, size=size)) for r in range(size)]
    flat = [b for share in shares for b in share]
    assert sorted(flat) == sorted(window)  # every micro-batch once: the global batch is one device's
    assert max(map(len, shares)) == math.ceil(n_micro / size)
    assert share_window(window, World()) == window


def test_engines_chosen_in_accelerate_config_are_not_silently_ignored():
    with pytest.raises(ConfigError, match="train.distributed.*DeepSpeed"):
        check_launch({"ACCELERATE_USE_DEEPSPEED": "true"}, "ddp")
    with pytest.raises(ConfigError, match="train.distributed: fsdp"):
        check_launch({"ACCELERATE_USE_FSDP": "true"}, "ddp")
    check_launch({"ACCELERATE_USE_FSDP": "true"}, "fsdp")
    check_launch({}, "ddp")


def test_one_engine_per_launch_and_one_process_is_plain_torch():
    assert strategy_for(World(), "fsdp") is OneProcess  # nothing to share without a second process
    assert strategy_for(World(rank=1, size=2), "ddp") is Replicas
    assert strategy_for(World(rank=1, size=2), "fsdp") is Shards
    assert Shards.sharded and not Replicas.sharded and not OneProcess.sharded

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    batch = {"x": torch.randn(3, 4)}

    def loss_of(m, b):
        return m(b["x"]).sum()

    strategy = build_strategy(model, TrainConfig(distributed="fsdp"), World(), loss_of)
    assert isinstance(strategy, OneProcess) and strategy.trainable_state() is None
    with strategy.micro_batch(last=False):
        loss = strategy.loss(batch)
        loss.backward()
    assert torch.equal(loss, loss_of(model, batch))
    total = loss.detach().clone()
    assert strategy.reduce_loss_(total) is total and torch.equal(total, loss)  # nothing to sum
    want = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert torch.allclose(strategy.clip_grad_norm(list(model.parameters()), 1e9), want)


def test_fsdp_asked_for_in_one_process_says_it_shards_nothing(tmp_path, monkeypatch, capsys):
    from chattune.config.load import load_config
    from chattune.train.job import check_run

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    out = f"train.output_dir={tmp_path / 'run'}"
    check_run(load_config(None, ["train.distributed=fsdp", out]), resume=False)
    assert (
        "fsdp shards the weights over several processes, and this run is one process"
        in capsys.readouterr().err
    )
    check_run(load_config(None, [out]), resume=False)  # ddp, the default: nothing to say
    assert capsys.readouterr().err == ""


def test_gpus_flag_runs_chattune_under_torchrun():
    cmd = torchrun_command(4, ["train", "c.yaml", "train.lr=1e-4"])
    assert cmd[:3] == [sys.executable, "-m", "chattune.train.world"]  # torchrun with a loopback rendezvous
    assert "--nproc_per_node=4" in cmd and "--rdzv-backend=chattune-loopback" in cmd
    assert cmd[-5:] == ["-m", "chattune", "train", "c.yaml", "train.lr=1e-4"]
    assert loopback_env({})["GLOO_SOCKET_IFNAME"] == "lo"
    assert loopback_env({"NCCL_SOCKET_IFNAME": "eth1"})["NCCL_SOCKET_IFNAME"] == "eth1"  # the user's choice


LISTENERS = """
import os, subprocess, sys, torch.distributed as dist
dist.init_process_group("gloo")
dist.barrier()
if dist.get_rank() == 0:  # every socket the launcher and its workers listen on, while they run
    agent = os.getppid()
    tree = {agent, *(int(p) for t in os.listdir(f"/proc/{agent}/task")
            for p in open(f"/proc/{agent}/task/{t}/children").read().split())}
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    ours = [line.split()[3] for line in out.splitlines() if any(f"pid={p}," in line for p in tree)]
    print("LISTEN", " ".join(ours), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_torchrun_of_gpus_flag_listens_on_loopback_only(tmp_path):
    """torchrun's own rendezvous store listens on every interface (`*:PORT`); ours only on 127.0.0.1."""
    (tmp_path / "listeners.py").write_text(LISTENERS, encoding="utf-8")
    env = loopback_env({**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{tmp_path}", "OMP_NUM_THREADS": "1"})
    cmd = torchrun_command(2, [], module="listeners")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("LISTEN")]
    addresses = line.split()[1:]
    assert len(addresses) >= 3, addresses  # the store, and each worker's gloo socket
    assert all(a.startswith(("127.0.0.1:", "[::1]:")) for a in addresses), addresses


# -- two processes against one -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    """22 training records (11 micro-batches of 2: steps of 5, 5 and 1, so one step leaves a rank idle)
    and 4 held-out ones."""
    records = json.loads(HUANHUAN.read_text(encoding="utf-8"))
    d = tmp_path_factory.mktemp("data")
    train, held = d / "train.json", d / "eval.json"
    train.write_text(json.dumps(records[:22], ensure_ascii=False), encoding="utf-8")
    held.write_text(json.dumps(records[100:104], ensure_ascii=False), encoding="utf-8")
    return train, held


def tiny_tree(model_dir: Path, data: tuple[Path, Path], out: Path, **train) -> dict:
    return {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "data": {
            "train_path": str(data[0]),
            "eval_path": str(data[1]),
            "max_len": 64,
            "on_bad_row": "skip",  # rows whose answer does not fit in 64 tokens: dropped and counted
            "system_prompt": "甄嬛",
        },
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},  # dropout would draw different masks per rank
        "train": {
            "output_dir": str(out),
            "micro_batch_size": 2,
            "grad_accum_steps": 5,
            "epochs": 2,
            "lr": 1e-2,
            "logging_steps": 1,
            "progress": False,
            "device": "cpu",
            **train,
        },
        "eval": {"samples": 1, "max_new_tokens": 4, "batch_size": 4},
        "track": {"backend": "none"},
    }


def run_two_processes(tree: dict, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    cwd = tmp_path / "cwd"  # empty: nothing may appear here
    cwd.mkdir(exist_ok=True)
    env = loopback_env({**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"})
    cmd = torchrun_command(2, ["train", str(cfg), *flags])
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not any(cwd.iterdir()), list(cwd.iterdir())
    return done


def rows(run_dir: Path, key: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if key in r]


@pytest.mark.parametrize(
    "mode, packing, reshard",
    [("ddp", False, "auto"), ("fsdp", True, "on"), ("fsdp", True, "off")],
    ids=["ddp-padded", "fsdp-packed", "fsdp-packed-kept-gathered"],
)
def test_two_processes_follow_one_process_and_only_rank0_writes(
    mode, packing, reshard, tiny_model_dir, data_files, tmp_path
):
    # grad_accum_steps 5 over 2 processes: 3 micro-batches and 2 plus a blank one, gradients crossing
    # ranks once per step (DDP's no_sync, FSDP's gradient sync and resharding off until the last).
    extra = {"packing": packing, "pack_tokens": 96} if packing else {}
    extra["fsdp_reshard_after_forward"] = reshard
    extra["save_steps"] = 2  # checkpoints at steps 2 and 4 of 6 (the last one is kept)
    one = run(config_from_dict(tiny_tree(tiny_model_dir, data_files, tmp_path / "one" / "run", **extra)))

    two_root = tmp_path / "two"
    tree = tiny_tree(tiny_model_dir, data_files, two_root / "run", distributed=mode, **extra)
    done = run_two_processes(tree, tmp_path)
    two = two_root / "run"

    # One run directory, one report, one adapter, nothing half-written; rank 1 printed nothing of its own.
    assert [p.name for p in two_root.iterdir()] == ["run"]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert (two / "report.html").is_file() and (two / "adapter" / "adapter_model.safetensors").is_file()
    assert done.stderr.count("done in") == 1
    summary = json.loads((two / "summary.json").read_text(encoding="utf-8"))
    assert summary["distributed"] == {"processes": 2, "mode": mode}

    # Same loss curve, step by step, as one process with the same global batch. AdamW barely notices a
    # gradient scaled by a constant, so the gradient norm is what shows that ranks SUM (not average).
    a, b = rows(one, "train/loss"), rows(two, "train/loss")
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 4
    for ra, rb in zip(a, b, strict=True):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=REL_TOL), ra["step"]
        assert rb["train/grad_norm"] == pytest.approx(ra["train/grad_norm"], rel=1e-4), ra["step"]
    ea, eb = rows(one, "eval/loss"), rows(two, "eval/loss")
    assert len(ea) == len(eb) == 3  # baseline + two epochs, evaluated by rank 0 only
    for ra, rb in zip(ea, eb, strict=True):
        assert rb["eval/loss"] == pytest.approx(ra["eval/loss"], rel=REL_TOL)
    assert len((two / "predictions.jsonl").read_text(encoding="utf-8").splitlines()) == 3  # 1 sample x 3

    # The adapters agree too (the FSDP one was gathered from its shards).
    from safetensors.torch import load_file

    wa = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() <= 1e-4 * max(wa[k].abs().max(), 1e-3), k

    # A crash after the step-4 checkpoint, resumed by two processes, logs what the uninterrupted run logged.
    assert [p.name for p in (two / "checkpoints").iterdir()] == ["step-0000004"]
    shutil.rmtree(two / "adapter")
    (two / "summary.json").unlink()
    kept = [
        line for line in (two / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 4
    ]
    (two / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    run_two_processes(tree, tmp_path, "--resume")
    resumed = rows(two, "train/loss")
    assert [r["step"] for r in resumed] == [r["step"] for r in b]
    for ra, rb in zip(b[4:], resumed[4:], strict=True):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=REL_TOL), ra["step"]
        assert rb["train/lr"] == pytest.approx(ra["train/lr"], rel=1e-6)
    assert (two / "adapter" / "adapter_model.safetensors").is_file()


def test_two_processes_resume_bit_for_bit_with_dropout(tiny_model_dir, data_files, tmp_path):
    """Each rank draws its own dropout masks; a checkpoint holds every rank's generators and restores them."""
    tree = tiny_tree(tiny_model_dir, data_files, tmp_path / "run", save_steps=2)
    tree["lora"]["dropout"] = 0.1
    tree["eval"] = {"samples": 0, "loss": False}
    run_two_processes(tree, tmp_path)
    out = tmp_path / "run"
    full = rows(out, "train/loss")
    from safetensors.torch import load_file

    before = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    shutil.rmtree(out / "adapter")  # a crash after the last step's log line
    (out / "summary.json").unlink()
    run_two_processes(tree, tmp_path, "--resume")
    keys = ("step", "train/loss", "train/lr", "train/grad_norm")
    again = [{k: r[k] for k in keys} for r in rows(out, "train/loss")]
    assert again == [{k: r[k] for k in keys} for r in full]  # steps 5 and 6 again, once, to the last bit
    after = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_data_stops_every_rank_before_anything_is_written(tiny_model_dir, data_files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "ok"}\n{"instruction": 3}\n', encoding="utf-8")
    tree = tiny_tree(tiny_model_dir, (bad, data_files[1]), tmp_path / "out" / "run")
    tree["data"]["on_bad_row"] = "error"  # the default: the first bad row stops the run
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    env = loopback_env({**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"})
    cmd = torchrun_command(2, ["train", str(cfg)])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    # The first rank to fail names the file and line; torchrun then stops the other one.
    assert "error: " in done.stderr and "bad.jsonl:2" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "env, train, match",
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, {}, "DeepSpeed"),
        ({"ACCELERATE_USE_FSDP": "true"}, {"distributed": "ddp"}, "train.distributed: fsdp"),
    ],
)
def test_unsupported_launches_fail_before_any_collective(
    env, train, match, monkeypatch, data_files, tmp_path
):
    """Raised by rank 0 of a pretended 2-process launch before it would join the group: nothing hangs."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", **env}.items():
        monkeypatch.setenv(key, value)
    tree = tiny_tree(Path("/nonexistent-model"), data_files, tmp_path / "run", **train)
    with pytest.raises(ConfigError, match=match):
        run(config_from_dict(tree))
    assert not (tmp_path / "run").exists()


def test_a_model_without_decoder_layers_names_the_setting_that_needs_them():
    import torch

    from chattune.errors import ChattuneError
    from chattune.train.strategies import decoder_layers

    with pytest.raises(ChattuneError, match=r"^train.distributed: cannot find .*set train.distributed: ddp$"):
        decoder_layers(torch.nn.Linear(2, 2), "train.distributed: ddp")
    with pytest.raises(ChattuneError, match=r"^train.compile: .*set train.compile: off$"):
        decoder_layers(torch.nn.Linear(2, 2))
