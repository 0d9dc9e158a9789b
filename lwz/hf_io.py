"""Hugging Face model folders: config.json plus safetensors weights, one file or shards with an
index. Loads into / saves from any module whose parameter names are ours; HF tensor names are ours
with "model." in front, except "lm_head.weight" (absent when tied). Imports nothing of lwz's, so
lwz.model and lwz.checkpoint both build on it."""

from __future__ import annotations

import json
import os
import shutil

import torch


class ModelLoadError(ValueError):
    """A model folder or config that cannot be used; the message names the file and the problem."""


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


def save_hf_model(state_dict: dict, cfg, folder: str, max_shard_bytes: int = 5 * 2**30,
                  dtype: torch.dtype | None = None, name_map=hf_name, config_dict: dict | None = None,
                  tokenizer_path: str | None = None) -> None:
    """Write config.json and safetensors (sharded with an index above `max_shard_bytes`), and the
    tokenizer files of folder `tokenizer_path` when given (copy_tokenizer_files).

    Written into `folder + '.tmp'` then renamed, so a crash never leaves a half-written folder
    under the final name. `state_dict` holds full (unsharded) tensors with our names; `cfg` is the
    model's lwz.model.ModelConfig (its tie_word_embeddings, and to_hf() for config.json)."""
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
