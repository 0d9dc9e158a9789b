"""Run hygiene and faults through the real command line: reruns never mix or lose runs, resumes
refuse incompatible changes, bad input stops before any work with one line (also under torchrun),
damaged checkpoints are named, workers die with their launcher, the HF export carries the
tokenizer, and train_rm's small-data and pipe cases.

One finished 2-process run (module fixture) is the "earlier run" every case must leave unchanged
(hashes of all its files before and after). The start-up error cases run in one driver process
that imports lwz.train once and forks a child per case (each child runs `main(argv)`, the CLI's
entry point, with its own stdout/stderr and exit code): an import costs seconds on a busy CPU."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "lwz", "train.py")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    return env


def _args(base, name, extra=()):
    """CLI arguments of a short tiny run named `name` under base/runs, with the fixture's own copies
    of the model folder and prompt file (so a case can change their content)."""
    return ["--config", os.path.join(ROOT, "configs/tiny.toml"), f"--logging.run_dir={base}/runs", f"--name={name}",
            f"--model.path={base}/model", f"--data.prompts={base}/prompts.jsonl", "--logging.plot=false",
            "--rollout.max_new_tokens=16", "--rollout.prompts_per_step=2", "--rollout.group_size=4",
            "--logging.progress=false", *extra]


def _torchrun_cmd(args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TRAIN, *args]


def _run(cmd, timeout=600):
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def tree_hash(folder) -> dict:
    """{relative path: sha256} of every file under folder."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _one_error_line(stderr: str) -> str:
    """The single error line of a failed start (lwz's INFO log lines excepted); no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [l for l in stderr.strip().splitlines() if not l.startswith("lwz: ")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(("error: ", "config error: ")), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished 3-step, 2-process run `done` (checkpoint every 2 steps, keep 2, HF export)."""
    base = tmp_path_factory.mktemp("faults")
    shutil.copytree(os.path.join(ROOT, "assets/tiny-model"), base / "model")
    shutil.copyfile(os.path.join(ROOT, "data/tiny_prompts.jsonl"), base / "prompts.jsonl")
    r = _run(_torchrun_cmd(_args(base, "done", ["--steps=3", "--checkpoint.every=2", "--checkpoint.keep=2"])))
    assert r.returncode == 0, r.stderr[-3000:]
    return base


def _copy_run(base, src, dst):
    shutil.copytree(base / "runs" / src, base / "runs" / dst)
    return base / "runs" / dst


def test_finished_run_keeps_last_step_and_exports_tokenizer(done):
    run = done / "runs" / "done"
    # every = 2 with steps = 3: the last step is checkpointed too; keep = 2
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000002", "step_00000003"]
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    import torch
    import transformers

    from lwz.tokenizer import encode, load_tokenizer
    tok = transformers.AutoTokenizer.from_pretrained(str(run / "hf"))
    ours = load_tokenizer(os.path.join(ROOT, "assets/tokenizer"))
    assert len(tok) == len(ours) == 1024 and tok.eos_token == "<|endoftext|>"
    text = "<think> plan </think><answer> Write three hundred words, naïve café 你好!\n\n </answer><|endoftext|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == encode(ours, text) and tok.decode(ids) == text
    # transformers 5 builds Qwen2Tokenizer for a qwen2 folder, whose pre-tokenizer splits digits one
    # by one where the bundled tokenizer's keeps runs of them: the text still round-trips, and the
    # generic class reads the exported tokenizer.json exactly
    digits = "Write 300 to 2,500 words."
    assert tok.decode(tok.encode(digits, add_special_tokens=False)) == digits
    exact = transformers.PreTrainedTokenizerFast.from_pretrained(str(run / "hf"))
    assert exact.encode(digits, add_special_tokens=False) == encode(ours, digits)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(run / "hf"))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(logits).all()


# ---- start-up errors: one line, nothing written ---------------------------------------------------

# (case id, extra CLI arguments, name, substrings the one line must contain); {base} is the fixture folder
CASES = [
    ("steps_zero", ["--steps=0"], "fresh", ["steps = 0", ">= 1"]),
    ("nccl_without_gpu", ["--distributed.backend=nccl"], "fresh", ["distributed.backend = 'nccl'", "gloo"]),
    ("rerun_same_name", ["--steps=2"], "done",
     ["already holds a run", "--checkpoint.resume=auto", "--name", "--checkpoint.overwrite=true"]),
    ("resume_missing_path", ["--resume={base}/runs/nope/step_00000001"], "fresh",
     ["nope/step_00000001: checkpoint folder not found"]),
    ("tokenizer_beyond_vocab", ["--model.path={base}/small_vocab"], "fresh",
     ["ids up to 1023", "vocab_size 512", "small_vocab"]),
    ("overwrite_with_resume", ["--checkpoint.overwrite=true", "--resume=auto"], "done",
     ["checkpoint.overwrite", "resume"]),
    ("resume_incompatible", ["--resume=auto", "--seed=1", "--rollout.group_size=8", "--data.prompts={base}/other.jsonl",
                             "--steps=9", "--optim.lr=1e-3"], "done",
     ["cannot resume from", "done/checkpoints/step_00000003", "seed: 0 -> 1", "rollout.group_size: 4 -> 8",
      "data.prompts: "]),
    ("resume_prompt_content_changed", ["--resume=auto"], "content", ["data.prompts content", "sha256"]),
    ("truncated_shard", ["--resume=auto"], "trunc", ["trunc/checkpoints/step_00000003: shard __1_0.distcp is "
                                                     "truncated (100 bytes"]),
    ("missing_metadata", ["--resume=auto"], "nometa", ["nometa/checkpoints/step_00000003: .metadata is missing"]),
]

DRIVER = r"""
import json, os, sys, traceback
from lwz.train import main
cases, out = json.loads(sys.argv[1]), sys.argv[2]
for i, argv in enumerate(cases):
    pid = os.fork()
    if pid == 0:
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(os.path.join(out, f"{i}.{name}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            rc = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(rc)
    _, status = os.waitpid(pid, 0)
    with open(os.path.join(out, f"{i}.rc"), "w") as f:
        f.write(str(os.waitstatus_to_exitcode(status)))
"""


def _run_cases(base, argvs, out):
    """Run lwz.train.main(argv) for each argv in its own forked process; [(rc, stdout, stderr)]."""
    os.makedirs(out, exist_ok=True)
    r = _run([sys.executable, "-c", DRIVER, json.dumps(argvs), str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    return [(int((out / f"{i}.rc").read_text()), (out / f"{i}.out").read_text(), (out / f"{i}.err").read_text())
            for i in range(len(argvs))]


@pytest.fixture(scope="module")
def startup_errors(done):
    base = done
    # a model whose vocabulary is smaller than the tokenizer's 1024 ids
    shutil.copytree(base / "model", base / "small_vocab")
    cfg = json.loads((base / "small_vocab" / "config.json").read_text())
    (base / "small_vocab" / "config.json").write_text(json.dumps(dict(cfg, vocab_size=512)))
    shutil.copyfile(base / "prompts.jsonl", base / "other.jsonl")
    # copies of the finished run: damaged checkpoints, and one whose prompt file will change
    for name in ("trunc", "nometa", "content"):
        _copy_run(base, "done", name)
    shard = base / "runs" / "trunc" / "checkpoints" / "step_00000003" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    (base / "runs" / "nometa" / "checkpoints" / "step_00000003" / ".metadata").unlink()
    before = {n: tree_hash(base / "runs" / n) for n in os.listdir(base / "runs")}
    # same path, other content (a prompt moved to the end): only the identity hash can tell
    prompts = (base / "prompts.jsonl").read_text()
    lines = prompts.splitlines(keepends=True)
    argvs = [_args(base, name, [a.format(base=base) for a in extra]) for _, extra, name, _ in CASES]
    try:
        # for resume_prompt_content_changed; the other cases stop on their own error either way
        (base / "prompts.jsonl").write_text("".join(lines[1:] + lines[:1]))
        results = _run_cases(base, argvs, base / "cases")
    finally:
        (base / "prompts.jsonl").write_text(prompts)
    after = {n: tree_hash(base / "runs" / n) for n in os.listdir(base / "runs")}
    return dict(zip([c[0] for c in CASES], results)), before, after


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_startup_error_is_one_line_and_writes_nothing(startup_errors, case):
    results, before, after = startup_errors
    rc, out, err = results[case]
    needles = next(c[3] for c in CASES if c[0] == case)
    assert rc == 2, (rc, out, err)
    line = _one_error_line(err)
    for n in needles:
        assert n in line, (n, line)
    assert after == before  # no run folder created, no earlier run's file touched
    assert "fresh" not in after


def test_shape_mismatch_names_the_tensor(done):
    """The model folder at the same path changed shape since the checkpoint: the first differing
    tensor and both shapes, in one line."""
    base = done
    run = _copy_run(base, "done", "shape")
    before = tree_hash(run)
    cfg_path = base / "model" / "config.json"
    orig = cfg_path.read_text()
    try:
        cfg_path.write_text(json.dumps(dict(json.loads(orig), intermediate_size=160)))
        (rc, out, err), = _run_cases(base, [_args(base, "shape", ["--resume=auto"])], base / "cases_shape")
    finally:
        cfg_path.write_text(orig)
    assert rc == 2, err
    line = _one_error_line(err)
    assert "shape/checkpoints/step_00000003: tensor 'layers.0.mlp.gate_proj.weight' has shape (176, 64) " \
           "in the checkpoint, the model has (160, 64)" in line, line
    assert tree_hash(run) == before


def test_error_under_torchrun_leads_with_the_lwz_line(done):
    """Under torchrun the lwz line is printed once (not once per rank) and is what torchrun's own
    failure report quotes as the root cause, instead of a link to its docs."""
    run = done / "runs" / "done"
    before = tree_hash(run)
    r = _run(_torchrun_cmd(_args(done, "done", ["--steps=2"])))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    ours = [l for l in lines if l.startswith("error: ")]
    assert len(ours) == 1 and "already holds a run" in ours[0], r.stderr
    assert lines.index(ours[0]) < lines.index("Traceback (most recent call last):")  # before the launcher's report
    root = r.stderr[r.stderr.index("Root Cause"):]
    assert f"traceback : {ours[0]}" in root, r.stderr
    assert "To enable traceback" not in r.stderr
    assert r.stderr.count("Traceback") == 1  # torchrun's own ChildFailedError, none from a worker
    assert tree_hash(run) == before


# ---- reruns and resumes ----------------------------------------------------------------------------

def test_overwrite_moves_the_old_run_aside_and_context_warning(done):
    base = done
    run = _copy_run(base, "done", "ow")
    before = tree_hash(run)
    # 1024-token context - 1000 prompt tokens leaves 24 < 40 new tokens: a warning, not an error
    r = _run([sys.executable, TRAIN] + _args(base, "ow", ["--steps=1", "--checkpoint.overwrite=true",
                                                          "--data.max_prompt_tokens=1000",
                                                          "--rollout.max_new_tokens=40"]))
    assert r.returncode == 0, r.stderr[-3000:]
    moved = [n for n in os.listdir(base / "runs") if n.startswith("ow.old-")]
    assert len(moved) == 1 and f"moved the previous run in {run} to {base / 'runs' / moved[0]}" in r.stdout
    assert tree_hash(base / "runs" / moved[0]) == before  # moved, not changed
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert os.listdir(run / "checkpoints") == ["step_00000001"]
    warn = [l for l in r.stderr.splitlines() if l.startswith("warning: rollout.max_new_tokens")]
    assert len(warn) == 1 and "= 40" in warn[0] and "(1024 - 1000 = 24)" in warn[0], r.stderr
    assert "effective max_new_tokens: 24" in warn[0], warn


def test_resume_from_an_earlier_checkpoint_with_safe_changes(done):
    """Resume at step 2 of a 3-step run with more steps, another lr and checkpoint cadence: the
    metrics continue after the checkpoint (a line torn by a kill is dropped), and pruning keeps
    the newest checkpoints below the one just written but never one numbered above it."""
    base = done
    run = _copy_run(base, "done", "rs")
    shutil.copytree(run / "checkpoints" / "step_00000003", run / "checkpoints" / "step_00000009")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward_to')  # torn by a kill mid-write
    r = _run([sys.executable, TRAIN] + _args(base, "rs", [f"--resume={run}/checkpoints/step_00000002", "--steps=4",
                                                          "--optim.lr=1e-3", "--checkpoint.every=2",
                                                          "--checkpoint.keep=2"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {run}/checkpoints/step_00000002 at step 2" in r.stdout
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2, 3, 4]
    # step 4 written; of those below it only the newest (3) kept; 9 is not this resume's to prune
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000003", "step_00000004", "step_00000009"]


def test_prune_keeps_only_older_checkpoints_of_this_run(tmp_path):
    """save_training_state's pruning: with keep = 2 after writing step 3, only step 2 survives
    below it; step 5 (above) and foreign folders are left alone."""
    import torch

    from lwz.checkpoint import latest_checkpoint, save_training_state
    root = tmp_path / "checkpoints"
    for n in ("step_00000001", "step_00000002", "step_00000005", "notes", "step_00000004.tmp"):
        (root / n).mkdir(parents=True)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    save_training_state(str(root), 3, model, opt, 0, extra=dict(step=3), keep=2)
    assert sorted(os.listdir(root)) == ["notes", "step_00000002", "step_00000003", "step_00000004.tmp",
                                        "step_00000005"]
    assert latest_checkpoint(str(root)).endswith("step_00000003")  # 5 has no COMPLETE marker


# ---- the launcher dies -----------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds the workers through /proc")
def test_workers_exit_when_torchrun_is_killed(done):
    base = done
    run = base / "runs" / "kill"
    log = open(base / "kill.log", "w")
    proc = subprocess.Popen(_torchrun_cmd(_args(base, "kill", ["--steps=500", "--checkpoint.every=1"])), cwd=ROOT,
                            env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    workers = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (run / "checkpoints" / "step_00000001").is_dir():
            time.sleep(0.1)
        assert proc.poll() is None, (base / "kill.log").read_text()[-3000:]
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only: its workers sit in their own sessions
        proc.wait()
        t0 = time.time()
        while time.time() - t0 < 10 and any(_alive(p) for p in workers):
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers), f"workers {workers} outlived their launcher"
    finally:
        for p in workers:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    n = len((run / "metrics.jsonl").read_text().splitlines())
    assert n < 500, "the run finished before it was killed"
    # the newest complete checkpoint resumes (one more step, one process)
    from lwz.checkpoint import latest_checkpoint
    last = latest_checkpoint(str(run / "checkpoints"))
    step = int(last.rsplit("_", 1)[1])
    r = _run([sys.executable, TRAIN] + _args(base, "kill", ["--resume=auto", f"--steps={step + 1}"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {last} at step {step}" in r.stdout
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, step + 2))


def test_watchdog_exits_without_parent_death_signal(tmp_path):
    """Where prctl is unavailable the parent-pid watchdog alone ends the worker."""
    pidfile = tmp_path / "pid"
    child = ("import os, sys, time\n"
             "from lwz.distributed import die_with_launcher\n"
             "sys.platform = 'darwin'  # skip the Linux parent-death signal\n"
             "os.environ['TORCHELASTIC_RUN_ID'] = 'test'\n"
             "die_with_launcher(poll_s=0.1)\n"
             f"open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
             "time.sleep(120)\n")
    parent = ("import subprocess, sys, time, os\n"
              f"subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True)\n"
              "t0 = time.time()\n"
              f"while not os.path.exists({str(pidfile)!r}) and time.time() - t0 < 240: time.sleep(0.05)\n"
              "time.sleep(0.3)\n"
              "os._exit(0)\n")
    env = _env()
    subprocess.run([sys.executable, "-c", parent], cwd=ROOT, env=env, timeout=300, check=True)
    pid = int(pidfile.read_text())
    t0 = time.time()
    while time.time() - t0 < 10 and _alive(pid):
        time.sleep(0.05)
    alive = _alive(pid)
    if alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "the worker outlived its parent"


# ---- train_rm ----------------------------------------------------------------------------------

def test_train_rm_one_pair_and_data_from_a_pipe(tmp_path):
    cfg = dict(model_type="llama", vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, pad_token_id=1, max_position_embeddings=256)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    pair = json.dumps({"prompt": "Write a poem.", "chosen": "A good poem.", "rejected": "bad"}) + "\n"
    fifo = tmp_path / "pairs.fifo"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "w") as f:
            f.write(pair)
    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    r = _run([sys.executable, "-m", "lwz.rewards.train_rm", "--data", str(fifo), "--init",
              str(tmp_path / "config.json"),
              "--tokenizer", os.path.join(ROOT, "assets/tokenizer"), "--out", str(tmp_path / "rm"), "--steps", "2",
              "--warmup", "1", "--template", "plain", "--max-length", "64"], timeout=300)
    writer.join(timeout=5)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    note = [l for l in r.stderr.splitlines() if l.startswith("note: ")]
    assert len(note) == 1 and "1 pair(s)" in note[0] and "no eval accuracy" in note[0], r.stderr
    final = json.loads((tmp_path / "rm" / "train_rm_metrics.json").read_text())
    assert final["train_pairs"] == 1 and not any(k.startswith("eval_") for k in final), final
    assert "NaN" not in r.stdout
    # a folder is still refused in one line
    r = _run([sys.executable, "-m", "lwz.rewards.train_rm", "--data", str(tmp_path), "--init",
              str(tmp_path / "config.json"), "--out", str(tmp_path / "rm2")], timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path}: is a folder, expected a preference file (JSONL)"
