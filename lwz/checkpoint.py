"""Checkpoints: the training state (torch.distributed.checkpoint, written atomically, resumable)
and the run folder (its config, resume checks). Hugging Face model folders are lwz.hf_io's."""

from __future__ import annotations

import os
import shutil

import torch

from lwz.hf_io import ModelLoadError

# ---- training state (torch.distributed.checkpoint) -------------------------------------------------

COMPLETE = "COMPLETE"


def _step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def _step_of(name: str) -> int | None:
    """N of a complete-or-not checkpoint folder name step_N (None for anything else, *.tmp included)."""
    if not name.startswith("step_") or not name[5:].isdigit():
        return None
    return int(name[5:])


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint under `root` (a folder with the COMPLETE marker), or None.
    Half-written ones (`*.tmp`, killed mid-write) are ignored."""
    if not os.path.isdir(root):
        return None
    done = [n for n in os.listdir(root) if n.startswith("step_") and not n.endswith(".tmp")
            and os.path.isfile(os.path.join(root, n, COMPLETE))]
    return os.path.join(root, max(done)) if done else None


def _rng_state() -> dict:
    import random

    import numpy as np
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    import random

    import numpy as np
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def save_training_state(root: str, step: int, model, optimizer, rank: int, extra: dict, keep: int = 0) -> str:
    """Model + optimizer (sharded, DCP), every rank's RNG state and `extra` (step, scheduler, data
    cursor) into root/step_N. Written under step_N.tmp and renamed once every rank has finished, so
    a kill during the write leaves the previous checkpoint as the newest complete one."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = _step_dir(root, step)
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        torch.save(extra, os.path.join(tmp, "extra.pt"))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            f.write(str(step))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if keep > 0:  # only this run's older checkpoints: never one above the step just saved
            older = sorted(n for n in os.listdir(root) if _step_of(n) is not None and _step_of(n) < step)
            for n in older[:max(0, len(older) - (keep - 1))]:
                shutil.rmtree(os.path.join(root, n), ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final


def load_training_state(path: str, model, optimizer, rank: int) -> dict:
    """Inverse of save_training_state; returns `extra`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    meta = check_checkpoint_files(path)
    check_checkpoint_shapes(path, meta, model)
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as e:  # noqa: BLE001 - every rank raises it (DCP gathers the failures)
        raise ModelLoadError(f"{path}: cannot load the training checkpoint ({_first_line(e)})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.isfile(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
    return torch.load(os.path.join(path, "extra.pt"), weights_only=False)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_checkpoint_files(path: str):
    """Check a training checkpoint folder before anything is loaded: the COMPLETE marker, extra.pt,
    a readable .metadata and every shard it names at least as long as the metadata says (a truncated
    .distcp is caught here, not deep in DCP). Returns the DCP Metadata; ModelLoadError (one line
    naming the folder) otherwise."""
    from torch.distributed.checkpoint import FileSystemReader

    if not os.path.isdir(path):
        raise ModelLoadError(f"{path}: checkpoint folder not found")
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        raise ModelLoadError(f"{path}: not a complete training checkpoint (no {COMPLETE} marker)")
    for name in (".metadata", "extra.pt"):
        if not os.path.isfile(os.path.join(path, name)):
            raise ModelLoadError(f"{path}: {name} is missing; the checkpoint cannot be loaded")
    try:
        meta = FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - a damaged pickle raises anything
        raise ModelLoadError(f"{path}: .metadata is unreadable ({_first_line(e)})") from None
    need: dict[str, int] = {}
    for info in meta.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, n in sorted(need.items()):
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            raise ModelLoadError(f"{path}: shard {name} is missing")
        size = os.path.getsize(f)
        if size < n:
            raise ModelLoadError(f"{path}: shard {name} is truncated ({size} bytes, the metadata needs {n})")
    return meta


def check_checkpoint_shapes(path: str, meta, model) -> None:
    """ModelLoadError naming the first model tensor whose shape differs between the checkpoint's
    metadata and `model` (global shapes: FSDP2 DTensors report the unsharded one), or that is missing."""
    saved = meta.state_dict_metadata
    for name, t in model.state_dict().items():
        entry = saved.get(f"model.{name}")
        if entry is None:
            raise ModelLoadError(f"{path}: the checkpoint has no tensor {name!r}; it was saved from a different model")
        if tuple(entry.size) != tuple(t.shape):
            raise ModelLoadError(f"{path}: tensor {name!r} has shape {tuple(entry.size)} in the checkpoint, "
                                 f"the model has {tuple(t.shape)}; it was saved from a different model")


# ---- run folders: reruns, resumes ----------------------------------------------------------------

# What makes a folder hold a run (a fresh start there would mix two runs).
RUN_ITEMS = ("config.toml", "metrics.jsonl", "checkpoints", "hf")

# Settings a resume may not change: they decide what the checkpointed weights, token ids, data
# cursor and sampling streams mean. Everything else (steps, learning rate, logging, checkpoint
# cadence, rollout limits, rewards' weights, ...) may change between a checkpoint and its resume.
RESUME_FIXED = ("seed", "model.path", "model.init", "tokenizer.path", "data.prompts", "data.shuffle",
                "rollout.group_size", "rollout.prompts_per_step", "cpt.sources", "cpt.heldout_share")


def file_identity(path: str) -> dict:
    """{path, size, sha256} of a regular file; a pipe or other stream is identified by its path alone."""
    import hashlib

    out = {"path": path}
    if os.path.isfile(path):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out.update(size=os.path.getsize(path), sha256=h.hexdigest())
    return out


def _dotted(d: dict, key: str):
    for part in key.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """The RESUME_FIXED settings (and the prompt file's identity) that differ between two run
    identities ({"config": to_dict(cfg), "prompts": file_identity(...)}), as 'key: old -> new'."""
    out = []
    for key in RESUME_FIXED:
        a, b = _dotted(saved.get("config", {}), key), _dotted(current.get("config", {}), key)
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    a, b = saved.get("prompts"), current.get("prompts")
    if a and b and a.get("sha256") and b.get("sha256") and (a["size"], a["sha256"]) != (b["size"], b["sha256"]):
        out.append(f"data.prompts content: {a['size']} bytes sha256 {a['sha256'][:12]} -> "
                   f"{b['size']} bytes sha256 {b['sha256'][:12]}")
    # a pretraining run: the token folders' identities (their inputs and tokenizer), source by source
    for k, (a, b) in enumerate(zip(saved.get("corpora") or [], current.get("corpora") or [])):
        if a != b:
            out.append(f"cpt.sources[{k}] content: the token folder was rebuilt from other inputs")
    return out


def _read_saved_identity(run_dir: str, path: str | None) -> dict | None:
    """The identity a checkpoint was saved with (its extra.pt), else the run's config.toml."""
    if path is not None:
        try:
            extra = torch.load(os.path.join(path, "extra.pt"), weights_only=False)
        except Exception as e:  # noqa: BLE001 - a damaged pickle raises anything
            raise ModelLoadError(f"{path}: extra.pt is unreadable ({_first_line(e)})") from None
        if "identity" in extra:
            return extra["identity"]
    toml = os.path.join(run_dir, "config.toml")
    if os.path.isfile(toml):
        import tomllib
        try:
            with open(toml, "rb") as f:
                return {"config": tomllib.load(f)}
        except (OSError, ValueError):
            return None
    return None


def check_run_start(cfg, identity: dict) -> str | None:
    """Decide how this start uses its run folder (cfg.run_path) before anything is written; returns
    the checkpoint folder to resume from, or None to start at step 0. One-line errors:
    - checkpoint.resume = "none" in a folder that holds a run (any of RUN_ITEMS), unless
      checkpoint.overwrite (start_run_folder then moves that run aside);
    - an explicit checkpoint path that is missing or damaged (check_checkpoint_files);
    - a resume whose RESUME_FIXED settings or prompt file differ from the saved run's.
    resume = "auto" with no complete checkpoint starts at step 0 in the same folder."""
    from lwz.config import ConfigError

    run_dir, c = cfg.run_path, cfg.checkpoint
    if c.resume == "none":
        held = [n for n in RUN_ITEMS if os.path.exists(os.path.join(run_dir, n))]
        if held and not c.overwrite:
            raise ConfigError(
                f"{run_dir} already holds a run ({', '.join(held)}): continue it with --checkpoint.resume=auto, "
                f"choose another --name, or pass --checkpoint.overwrite=true to move it aside to "
                f"{run_dir}.old-<time>")
        return None
    if c.resume == "auto":
        path = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    else:
        path = c.resume.rstrip("/")
    if path is not None:
        check_checkpoint_files(path)
    # the checkpoint's own identity, and the run folder's config.toml (a resume continues that run)
    toml = os.path.join(run_dir, "config.toml")
    sources = ([(path, _read_saved_identity(run_dir, path))] if path is not None else []) + \
        [(toml, _read_saved_identity(run_dir, None))]
    for where, saved in sources:
        bad = resume_conflicts(saved, identity) if saved is not None else []
        if bad:
            raise ConfigError(f"cannot resume from {where}: settings a resume must keep have changed: "
                              f"{'; '.join(bad)} (start a new run under another --name)")
    return path


def start_run_folder(cfg) -> str | None:
    """Rank 0, after every start-up check passed: with checkpoint.overwrite, move the run already in
    cfg.run_path aside to `<run>.old-<YYYYmmdd-HHMMSS>` (never deleted; returns that path), then
    create the folder and write the resolved config.toml."""
    import time

    from lwz.config import save_config

    run_dir, moved = cfg.run_path, None
    if cfg.checkpoint.resume == "none" and cfg.checkpoint.overwrite and \
            any(os.path.exists(os.path.join(run_dir, n)) for n in RUN_ITEMS):
        moved = f"{run_dir.rstrip('/')}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while os.path.exists(moved):
            moved = f"{run_dir.rstrip('/')}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
            n += 1
        os.replace(run_dir, moved)
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, os.path.join(run_dir, "config.toml"))
    return moved
