"""The training example runs end to end (tiny settings) and reports what it promises."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_lm.py"


def test_train_lm_example_runs(tmp_path):
    out = tmp_path / "train_lm.json"
    cmd = [sys.executable, str(EXAMPLE), "--steps", "3", "--batch", "2", "--seg-len", "32", "--segments", "2",
           "--dim", "32", "--depth", "2", "--heads", "2", "--eval-every", "2", "--eval-batches", "1",
           "--text-mb", "1", "--threads", "1", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["meta"]["args"]["mem_len"] == 32
    got = {(r["task"], r["config"]) for r in data["results"]}
    assert got == {(t, c) for t in ("text", "recall") for c in ("rev-mem", "plain-mem", "rev-nomem")}
    for r in data["results"]:
        final = r["final"]
        assert [h["step"] for h in r["history"]] == [2, 3]
        assert r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0
        assert 0 < final["bits_per_byte"] < 20
        if r["task"] == "recall":
            assert 0 <= final["remote_recall"] <= 1 and 0 <= final["local_recall"] <= 1
    # Same seed, same data, same initial weights: reversible and plain train the same model.
    by = {(r["task"], r["config"]): r for r in data["results"]}
    for task in ("text", "recall"):
        a, b = by[(task, "rev-mem")]["history"], by[(task, "plain-mem")]["history"]
        assert torch.allclose(torch.tensor([h["loss"] for h in a]), torch.tensor([h["loss"] for h in b]), rtol=1e-3)
    assert "remote" in proc.stdout and "wrote" in proc.stdout


def _module():
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import train_lm
    finally:
        sys.path.pop(0)
    return train_lm


def test_every_flag_has_help_and_quick_is_small():
    train_lm = _module()
    parser = train_lm.make_parser()
    for action in parser._actions:
        if action.help is not None and action.help != "==SUPPRESS==":
            assert action.help.strip(), action.option_strings
        elif action.help is None:
            raise AssertionError(f"{action.option_strings} has no help text")
    args = train_lm.parse(["--quick", "--steps", "7"])
    assert args.steps == 7 and args.dim == train_lm.QUICK["dim"]  # explicit flags win over --quick


def test_recall_data_marks_remote_answers():
    train_lm = _module()
    data = train_lm.RecallData(32, 3)
    x, y, w, remote = data.batch(4, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == w.shape == remote.shape == (4, 96)
    assert torch.equal(x[:, 1:], y[:, :-1])
    for b in range(4):
        for t in torch.nonzero(w[b]).flatten().tolist():
            key = int(x[b, t]) - train_lm.QUERY0
            value = int(y[b, t]) - train_lm.ANSWER0
            pair = train_lm.PAIR0 + 16 * key + value
            seg = t // 32
            earlier = (x[b, :t] == pair).nonzero().flatten().tolist()
            assert earlier, "every query's pair occurs before it"
            in_segment = any(p >= seg * 32 for p in earlier)
            assert bool(remote[b, t]) == (not in_segment)
    assert remote.any() and (w & ~remote).any()


def _cp_run(tmp_path, nproc: int, n_cp: int) -> list:
    """examples/train_lm.py --context-parallel under torchrun (gloo); its per-step losses."""
    out = tmp_path / f"cp_{nproc}_{n_cp}.json"
    args = [str(EXAMPLE), "--context-parallel", str(n_cp), "--steps", "20", "--batch", "4", "--dim", "32",
            "--depth", "2", "--heads", "2", "--seg-len", "32", "--segments", "3", "--text-mb", "1", "--threads", "1",
            "--no-progress", "--out", str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(_free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert (res["context_parallel"], res["data_parallel"]) == (n_cp, nproc // n_cp)
    return res["losses"]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_context_parallel_trains_like_one_process(tmp_path):
    # 20 steps (60 optimiser steps, one per segment, memory carried): a 2-process ring, and a 2 x 2 mesh
    # (data parallel x context parallel), give one process's per-step losses to float32 round-off.
    one = torch.tensor(_cp_run(tmp_path, 1, 1), dtype=torch.float64)
    assert len(one) == 20 and one[-1] < one[0] - 1.0  # it learns
    for nproc, n_cp in ((2, 2), (4, 2)):
        got = torch.tensor(_cp_run(tmp_path, nproc, n_cp), dtype=torch.float64)
        assert torch.allclose(got, one, rtol=1e-5, atol=0), f"{nproc} processes, context parallel {n_cp}: " \
                                                           f"{(got - one).abs().max():.2e}"


def test_relative_positions_and_compressive_memory_flags(tmp_path):
    out = tmp_path / "train_lm.json"
    cmd = [sys.executable, str(EXAMPLE), "--task", "recall", "--configs", "rev-mem", "--steps", "3", "--batch", "2",
           "--seg-len", "32", "--segments", "4", "--mem-len", "16", "--cmem-len", "8", "--compression-rate", "2",
           "--positions", "relative", "--dim", "32", "--depth", "2", "--heads", "2", "--eval-every", "3",
           "--eval-batches", "1", "--threads", "1", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = json.loads(out.read_text())["results"]
    assert (r["positions"], r["mem_len"], r["cmem_len"], r["compression_rate"]) == ("relative", 16, 8, 2)
    assert 0 <= r["final"]["remote_recall"] <= 1
    assert "relative positions" in proc.stdout and "compressed memory 8 x rate 2" in proc.stdout
