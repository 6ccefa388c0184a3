"""Tensor parallelism on the CPU (gloo): a sharded model computes what the whole one does.

Ranks are real processes started by torch's elastic launcher (the API torchrun uses), each with one
thread. Tolerance: logits are float32, and a sharded model sums the same products in another order
(each rank's partial dot products over K/N terms, then the all-reduce); float32 rounding of a
reordered sum of K terms is about sqrt(K) * 1.2e-7 of its magnitude, compounded over the layers, so
1e-4 of the largest logit leaves a wide margin while a wrong slice (a head or a vocabulary row on
the wrong rank) changes logits by their own size.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import save_tiny

REL_TOL = 1e-4
PROMPT = [1, 17, 42, 99, 5, 300, 7, 11]
DECODE_STEPS = 4


def _llama_1b_args():
    """Llama-3.2-1B's shapes (GQA 32/8 heads of 64, d 2048, FFN 8192) with 2 layers and a 32768-token
    vocabulary instead of 16 and 128256, to keep a CPU test of two ranks and the reference light."""
    from llmrun.loading.presets import load_preset

    args = load_preset("preset:llama-3.2-1b").args
    return dataclasses.replace(args, num_hidden_layers=2, vocab_size=32768)


def _greedy(model, steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Prefill logits, then ``steps`` greedy decode steps on the fast path: (logits per step, tokens)."""
    from llmrun.model.executor import decode_step, make_cache, prefill

    cache = make_cache(model, 1, 64)
    logits = [prefill(model, torch.tensor([PROMPT]), cache)]
    tokens = [int(logits[0].argmax())]
    for _ in range(steps):
        logits.append(decode_step(model, torch.tensor([tokens[-1]]), cache, fast=True))
        tokens.append(int(logits[-1].argmax()))
    return logits, tokens


def _compare_worker(source: str) -> dict | None:
    """One rank: greedy run of its shard; rank 0 also runs the whole model and returns both."""
    from llmrun.distributed.group import join
    from llmrun.loading.loader import load_model
    from llmrun.loading.presets import random_model
    from llmrun.loading.shards import load_shard, random_shard

    comm, _ = join("cpu", threads=int(os.environ["LOCAL_WORLD_SIZE"]))
    cpu, fp32 = torch.device("cpu"), torch.float32
    if source == "llama-1b":
        args = _llama_1b_args()
        shard = lambda: random_shard(args, cpu, fp32, comm)  # noqa: E731
        whole = lambda: random_model(args, cpu, fp32)  # noqa: E731
    else:
        path = Path(source)
        shard = lambda: load_shard(path, cpu, fp32, comm)  # noqa: E731
        whole = lambda: load_model(path, cpu, fp32, progress=False)  # noqa: E731
    logits, tokens = _greedy(shard(), DECODE_STEPS)
    if comm.rank != 0:
        return None
    ref_logits, ref_tokens = _greedy(whole(), DECODE_STEPS)
    errors = [float((a - b).abs().max() / b.abs().max().clamp(min=1)) for a, b in zip(logits, ref_logits, strict=True)]
    return {"tokens": tokens, "ref_tokens": ref_tokens, "errors": errors}


def _launch(tp: int, source: str) -> dict:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=tp, rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0
    )
    return elastic_launch(config, _compare_worker)(source)[0]


@pytest.mark.parametrize("tp", [2])
def test_llama_1b_shaped_tp2_matches_tp1(tp):
    result = _launch(tp, "llama-1b")
    assert result["tokens"] == result["ref_tokens"]
    assert max(result["errors"]) < REL_TOL, result["errors"]


def test_smollm2_tp3_matches_tp1(smollm2_dir):
    """9 query heads and 3 key/value heads: one key/value head per rank."""
    result = _launch(3, str(smollm2_dir))
    assert result["tokens"] == result["ref_tokens"]
    assert max(result["errors"]) < REL_TOL, result["errors"]


def test_kv_heads_replicated_when_ranks_exceed_them():
    """4 query heads over 2 key/value heads on 4 ranks: ranks 0-1 hold head 0, ranks 2-3 head 1."""
    from llmrun.model.config import ModelArgs
    from llmrun.model.parallel import ShardPlan

    args = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2)  # fmt: skip
    spans = [ShardPlan(args, r, 4).span("model.layers.0.self_attn.k_proj.weight") for r in range(4)]
    assert spans == [(0, 0, 8), (0, 0, 8), (0, 8, 8), (0, 8, 8)]
    assert ShardPlan(args, 1, 4).span("model.layers.0.self_attn.o_proj.weight") == (1, 8, 8)
    bias = torch.ones(32)
    assert ShardPlan(args, 1, 4).piece("model.layers.0.mlp.down_proj.bias", bias).sum() == 0


@pytest.mark.parametrize(
    ("tp", "words"),
    [(3, "does not divide the model's attention heads"), (0, "at least 1"), (3, "neither divides")],
)
def test_bad_tp_refused_before_loading(tp, words, tmp_path):
    from llmrun.errors import LlmrunError
    from llmrun.model.config import ModelArgs
    from llmrun.model.parallel import check_tp

    heads = 6 if words == "neither divides" else 4
    args = ModelArgs(vocab_size=66, hidden_size=48, intermediate_size=66, num_hidden_layers=1,
                     num_attention_heads=heads, num_key_value_heads=2 if heads == 6 else 4)  # fmt: skip
    with pytest.raises(LlmrunError, match=words):
        check_tp(args, tp)


def test_cli_bad_tp_exits_2_before_loading(tmp_path, capsys):
    from llmrun.cli.app import run

    model = save_tiny(tmp_path / "tiny", num_key_value_heads=2)
    (model / "model.safetensors").write_bytes(b"not read")  # a load would fail on this
    capsys.readouterr()
    for tp, words in ((str((os.cpu_count() or 1) + 1), "exceeds the"), ("0", "at least 1")):
        assert run(["generate", "hi", "--model", str(model), "--random-weights", "--tp", tp]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err


def test_rank_killed_mid_generation_exits_within_10s(tmp_path):
    model = save_tiny(tmp_path / "tiny", num_key_value_heads=2, max_position_embeddings=16384)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "llmrun", "generate", "hi", "--model", str(model), "--random-weights", "--tp", "2",
           "-n", "16000", "--ignore-eos", "--temperature", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        proc.stdout.read(1)  # rank 0 is generating
        rank1 = _rank_pid(proc.pid, "1")
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - killed < 10
    finally:
        proc.kill()
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 1
    assert lines == ["llmrun: rank 1: was killed by SIGKILL"], lines


def _rank_pid(parent: int, rank: str, wait_s: float = 10.0) -> int:
    """The pid of the descendant of ``parent`` whose environment says RANK=``rank`` (looked for up to ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        processes = _processes()
        for pid, (_, environ) in processes.items():
            if pid != parent and f"RANK={rank}".encode() in environ and _descends(pid, parent, processes):
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} under pid {parent}")


def _processes() -> dict[int, tuple[int, list[bytes]]]:
    """pid -> (parent pid, environment) of every process readable now."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = int(next(line for line in status.splitlines() if line.startswith("PPid:")).split()[1])
        found[int(entry.name)] = (ppid, environ)
    return found


def _descends(pid: int, ancestor: int, processes: dict[int, tuple[int, list[bytes]]]) -> bool:
    """Whether ``ancestor`` is ``pid``'s parent, or its parent's, and so on."""
    while pid in processes and pid != ancestor:
        pid = processes[pid][0]
    return pid == ancestor and pid in processes


def test_profile_tp2_json_has_the_communication_rows(tmp_path):
    """Per layer, one all-reduce of the (B·T, d) activations after o_proj and one after down_proj:
    2(N-1)/N × message bytes each, float32 activations."""
    import json

    model = save_tiny(tmp_path / "tiny", num_key_value_heads=2)
    prompt_len, d = 8, 64
    cmd = [sys.executable, "-m", "llmrun", "profile", "--model", str(model), "--random-weights", "--tp", "2",
           "--format", "json", "--path", "eager", "--prompt-len", str(prompt_len), "--decode-tokens", "2",
           "--repeats", "1", "--warmup", "0", "--peak-flops", "1e11", "--peak-bandwidth", "1e10"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    from llmrun.profiler.schema import SCHEMA

    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(report, SCHEMA)
    for run in report["runs"]:
        tokens = prompt_len if run["phase"] == "prefill" else 1
        rows = {o["op"]: o for o in run["ops"] if o["op"].endswith("_allreduce")}
        assert set(rows) == {"attn_allreduce", "mlp_allreduce"}
        for row in rows.values():
            assert row["bytes"] == 2 * (2 - 1) / 2 * 4 * tokens * d
            assert row["layers"] == 2 and row["time_s"] > 0
            assert row["bound"] == "link" and row["light_s"] > 0  # rated against the link measured in the run
        assert any("rated against the link measured in this run" in note for note in run["notes"])
        totals = run["totals"]  # the share of the step in the all-reduces; MBU over main-memory bytes only
        assert totals["communication_s"] == pytest.approx(sum(r["time_s"] * r["layers"] for r in rows.values()))
        assert totals["communication_share"] == pytest.approx(totals["communication_s"] / totals["time_s"])
        link_bytes = sum(r["bytes"] * r["layers"] for r in rows.values())
        assert totals["mbu"] == pytest.approx((totals["bytes"] - link_bytes) / totals["time_s"] / 1e10)


def test_info_tp8_on_h200_predicts_per_rank_bytes_and_the_link_term(capsys):
    """Llama-3.1-70B on 8 H200s (datasheet roofs and NVLink): per-rank weights about an eighth, and a
    decode step of compute/memory time plus α·count + link bytes / bus bandwidth."""
    import json

    from llmrun.cli.app import run
    from llmrun.loading.presets import load_preset
    from llmrun.profiler.costs import decode_weight_bytes

    argv = ["info", "--model", "preset:llama-3.1-70b", "--dtype", "bf16", "--gpu", "H200 SXM", "--tp", "8", "--json"]
    assert run(argv) == 0
    tp = json.loads(capsys.readouterr().out)["tensor_parallel"]
    args = load_preset("preset:llama-3.1-70b").args
    whole = decode_weight_bytes(args, 2)
    norms = 2 * (2 * args.num_hidden_layers + 1) * args.hidden_size  # replicated on every rank
    assert tp["decode_weight_bytes_per_rank"] == pytest.approx((whole - norms) / 8 + norms, rel=1e-3)
    assert tp["kv_bytes_per_token_per_rank"] == 2 * 80 * 1 * 128 * 2  # one of 8 key/value heads per rank
    d, link = tp["decode"], tp["link"]
    assert d["collectives"] == 2 * 80 + 2
    message = 2 * args.hidden_size  # one bf16 token's activations
    layer_bytes = 2 * 80 * 2 * 7 / 8 * message
    assert d["link_bytes"] == pytest.approx(layer_bytes + 2 * 7 / 8 * message + 7 / 8 * 4 * args.vocab_size)
    assert d["comm_s"] == pytest.approx(link["latency_s"] * d["collectives"] + d["link_bytes"] / 450e9)
    assert d["step_s"] == pytest.approx(d["compute_s"] + d["comm_s"])


def test_info_tp_bad_values_are_refused(capsys):
    from llmrun.cli.app import run

    base = ["info", "--model", "preset:llama-3.1-8b", "--gpu", "L4"]
    for extra, words in ((["--tp", "3"], "does not divide"), (["--tp", "2", "--link-bandwidth", "0"], "positive")):
        assert run([*base, *extra]) == 2
        assert words in capsys.readouterr().err


def test_fast_path_profile_marks_the_all_reduces(tmp_path):
    """The decode fast path of a shard marks o_proj, attn_allreduce and attn_residual apart (and the MLP's)."""
    import json

    model = save_tiny(tmp_path / "tiny", num_key_value_heads=2)
    cmd = [sys.executable, "-m", "llmrun", "profile", "--model", str(model), "--random-weights", "--tp", "2",
           "--format", "json", "--prompt-len", "4", "--decode-tokens", "2", "--repeats", "1", "--warmup", "0",
           "--peak-flops", "1e11", "--peak-bandwidth", "1e10"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    decode = next(run for run in json.loads(done.stdout)["runs"] if run["phase"] == "decode")
    ops = {o["op"] for o in decode["ops"]}
    assert {"o_proj", "attn_allreduce", "attn_residual", "down_proj", "mlp_allreduce", "mlp_residual"} <= ops


def test_a_bad_input_on_the_ranks_is_one_line_and_exit_2(tmp_path):
    model = save_tiny(tmp_path / "tiny", num_key_value_heads=2)  # no tokenizer.json: every rank refuses it
    cmd = [sys.executable, "-m", "llmrun", "generate", "hi", "--model", str(model), "--tp", "2"]
    done = subprocess.run(cmd, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2
    assert len(lines) == 1 and lines[0].startswith("llmrun: rank 0: error: ") and "tokenizer.json" in lines[0], lines


def test_chat_tp2_rank0_reads_and_every_rank_answers_alike(tmp_path, smollm2_dir):
    import shutil

    model = save_tiny(tmp_path / "tok", num_key_value_heads=2, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, model / name)
    outputs = []
    for tp in ("1", "2"):
        cmd = [
            sys.executable,
            "-m",
            "llmrun",
            "chat",
            "--model",
            str(model),
            "--tp",
            tp,
            "-n",
            "5",
            "--temperature",
            "0",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, input=b"hello\n/reset\nagain\n", capture_output=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr.decode()
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1] and outputs[0].count(b"\n") >= 2
