"""Checkpoints: Hugging Face safetensors folders (load/save, sharded with an index) and the
training state (torch.distributed.checkpoint, written atomically, resumable).

HF tensor names are ours with "model." in front, except "lm_head.weight" (absent when tied).
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from lwz.model import ModelConfig, ModelLoadError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def hf_name(ours: str) -> str:
    return ours if ours.startswith("lm_head.") else "model." + ours


def our_name(hf: str) -> str:
    return hf[len("model."):] if hf.startswith("model.") else hf


def _shard_files(folder: str) -> list[str]:
    """The safetensors files of a folder: the index's shards, or the single model.safetensors."""
    index = os.path.join(folder, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(folder, name)):
                raise ModelLoadError(f"{os.path.join(folder, name)}: shard listed in {INDEX_NAME} is missing")
        return [os.path.join(folder, n) for n in files]
    single = os.path.join(folder, SINGLE_NAME)
    if os.path.isfile(single):
        return [single]
    raise ModelLoadError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME} found")


def _local_part(p: torch.Tensor):
    """(tensor to write, (first, end) rows of the full tensor it holds, or None for all of it).

    FSDP2 shards dim 0 like torch.chunk: with n rows over w ranks, rank r holds rows
    [r*c, min((r+1)*c, n)), c = ceil(n / w) (possibly none)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return p, None
    mesh = p.device_mesh
    if mesh.ndim != 1 or len(p.placements) != 1 or not p.placements[0].is_shard(0):
        raise ModelLoadError(f"loading into a parameter placed as {p.placements}: only FSDP2's dim-0 "
                             f"shards on a 1-D mesh are supported")
    local = p.to_local()
    n, w, r = p.shape[0], mesh.size(), mesh.get_local_rank()
    c = -(-n // w)
    first = min(r * c, n)
    assert local.shape[0] == min(n, first + c) - first, (local.shape, n, w, r)
    return local, (first, first + local.shape[0])


def load_state_into(module: torch.nn.Module, folder: str, name_map=our_name,
                    ignore: tuple[str, ...] = ()) -> None:
    """Stream the tensors of an HF folder into `module`'s parameters, shard by shard and tensor by
    tensor (never two copies of the weights in memory). Missing or unexpected tensors and shape
    mismatches stop with the tensor names. `ignore`: HF names that may be present and are skipped.

    Parameters already sharded by FSDP2 (DTensors, dim-0 shards) receive only their own rows, read
    with a safetensors slice: a rank never holds more than its shard plus one tensor's rows."""
    from safetensors import safe_open

    params = dict(module.named_parameters())
    params.update(dict(module.named_buffers()))
    seen, unexpected = set(), []
    for path in _shard_files(folder):
        try:
            f = safe_open(path, framework="pt", device="cpu")
        except Exception as e:  # truncated or corrupt header
            raise ModelLoadError(f"{path}: cannot read safetensors file ({e})") from None
        with f:
            for key in f.keys():
                if key in ignore:
                    continue
                name = name_map(key)
                if name not in params:
                    unexpected.append(key)
                    continue
                p = params[name]
                try:
                    sl = f.get_slice(key)
                    shape = tuple(sl.get_shape())
                    if shape != tuple(p.shape):
                        raise ModelLoadError(f"{path}: tensor {key!r} has shape {shape}, "
                                             f"the model expects {tuple(p.shape)}")
                    local, rows = _local_part(p)
                    t = f.get_tensor(key) if rows is None else sl[rows[0]:rows[1]]
                except ModelLoadError:
                    raise
                except Exception as e:  # data section shorter than the header says
                    raise ModelLoadError(f"{path}: cannot read tensor {key!r} ({e})") from None
                with torch.no_grad():
                    local.copy_(t)
                seen.add(name)
    missing = sorted(set(params) - seen)
    if unexpected:
        raise ModelLoadError(f"{folder}: unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if missing:
        names = [hf_name(m) for m in missing]
        raise ModelLoadError(f"{folder}: missing tensors {names[:8]}{' ...' if len(names) > 8 else ''}")


def load_hf_model(cls, folder: str, dtype=torch.float32, device="cpu", shard_fn=None, **kw):
    """Build `cls` (lwz.model.Transformer) from an HF folder: config.json + safetensors.

    shard_fn: optional callable applied to the model while it is still on the meta device (e.g.
    FSDP2 wrapping by lwz.distributed.shard_model); each rank then allocates and reads only its
    shard, so the full model is never materialised on one rank."""
    if not os.path.isdir(folder):
        raise ModelLoadError(f"{folder}: model folder not found")
    cfg = ModelConfig.from_hf(folder)
    with torch.device("meta"):
        model = cls(cfg, **kw).to(dtype)
    if shard_fn is not None:
        shard_fn(model)
    model = model.to_empty(device=device)
    # A checkpoint saved untied but configured tied (or the reverse) is a mismatch the tensor names
    # reveal. A tied model's folder may still carry an lm_head.weight (some re-saved checkpoints
    # do): as in transformers, the tie wins and that copy is skipped.
    load_state_into(model, folder, ignore=("lm_head.weight",) if cfg.tie_word_embeddings else ())
    return model


def save_hf_model(state_dict: dict, cfg: ModelConfig, folder: str, max_shard_bytes: int = 5 * 2**30,
                  dtype: torch.dtype | None = None, name_map=hf_name, config_dict: dict | None = None,
                  tokenizer_path: str | None = None) -> None:
    """Write config.json and safetensors (sharded with an index above `max_shard_bytes`), and the
    tokenizer files of folder `tokenizer_path` when given (copy_tokenizer_files).

    Written into `folder + '.tmp'` then renamed, so a crash never leaves a half-written folder
    under the final name. `state_dict` holds full (unsharded) tensors with our names."""
    from safetensors.torch import save_file

    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors = {}
    for k, v in state_dict.items():
        if cfg.tie_word_embeddings and k == "lm_head.weight":
            continue
        t = v.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name_map(k)] = t.to("cpu").contiguous()
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = tensors[k]
        size += nbytes
    shards.append(cur)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, SINGLE_NAME), metadata=meta)
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, name), metadata=meta)
            for k, t in shard.items():
                weight_map[k] = name
                total += t.numel() * t.element_size()
        with open(os.path.join(tmp, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config_dict if config_dict is not None else cfg.to_hf(), f, indent=2)
    if tokenizer_path is not None:
        copy_tokenizer_files(tokenizer_path, tmp)
    if os.path.isdir(folder):
        # keep any extra files the user had there (tokenizer ...) by moving them over first
        for name in os.listdir(folder):
            src, dst = os.path.join(folder, name), os.path.join(tmp, name)
            if not os.path.exists(dst) and not name.endswith(".safetensors") and name != INDEX_NAME:
                shutil.move(src, dst)
        shutil.rmtree(folder)
    os.replace(tmp, folder)


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
                "rollout.group_size", "rollout.prompts_per_step")


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


# Files of an HF tokenizer folder (never its model's config.json or weights).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copy the tokenizer files of folder `src` into `dst` (an exported model folder), so
    transformers' AutoTokenizer loads the model folder alone. Returns the names copied."""
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    for n in names:
        shutil.copyfile(os.path.join(src, n), os.path.join(dst, n))
    return names
