"""Hosting the quality reward model in a distributed run: which ranks load it (whole or as an
FSDP2 shard over its hosts), and how the other ranks' samples reach it and their scores come back.
Kept apart from lwz.rewards.quality, which is the model itself and needs no process group."""

from __future__ import annotations

import torch

from lwz.distributed import DTYPES, all_gather_objects, subgroup_mesh
from lwz.model import ModelConfig
from lwz.rewards.quality import QualityRewardModel, fill_broken


class HostedReward:
    """A reward model that lives only on `hosts` (rewards.quality_ranks): every rank sends its
    samples there, host h scores the samples whose global index i has i % len(hosts) == h, and the
    scores come back. Every rank must call it at the same time (it uses collectives); every host
    scores, even nothing, because a model sharded over the hosts needs all of them in each forward.
    Only valid answers travel; broken ones (None) get their floor from the calling rank's own
    batch, as a local model gives them."""

    name = "quality"

    def __init__(self, model, hosts: list[int], d):
        self.model, self.hosts, self.d = model, hosts, d

    def __call__(self, prompts, answers, meta):
        valid = [i for i, a in enumerate(answers) if a is not None]
        parts = all_gather_objects([(prompts[i], answers[i], meta[i]) for i in valid], self.d.world)
        flat = [x for part in parts for x in part]
        mine = {}
        if self.d.rank in self.hosts:
            idx = list(range(self.hosts.index(self.d.rank), len(flat), len(self.hosts)))
            p, a, m = zip(*[flat[i] for i in idx]) if idx else ((), (), ())
            mine = dict(zip(idx, self.model(list(p), list(a), list(m)).tolist()),
                        broken_score=self.model.broken_score)
        scores = {}
        for part in all_gather_objects(mine, self.d.world):
            scores.update(part)
        offset = sum(len(part) for part in parts[:self.d.rank])
        got = torch.full((len(prompts),), float("nan"))
        got[valid] = torch.tensor([scores[offset + j] for j in range(len(valid))], dtype=torch.float32)
        return fill_broken(got, scores["broken_score"])


def load_quality_model(cfg, d, hosts: list[int]):
    """The quality reward model on this rank: whole, an FSDP2 shard (rewards.quality_fsdp), or None
    on a rank that does not host it. Weights in the policy's compute dtype (distributed.param_dtype)
    on CUDA, fp32 on CPU."""
    r = cfg.rewards
    members = hosts or list(range(d.world))
    dtype = DTYPES[cfg.distributed.param_dtype] if d.device.type == "cuda" else torch.float32
    shard = r.quality_fsdp == "on"
    if r.quality_fsdp == "auto" and len(members) > 1:
        with torch.device("meta"):
            n = sum(p.numel() for p in QualityRewardModel(ModelConfig.from_hf(r.quality_path)).parameters())
        shard = n * dtype.itemsize >= r.quality_fsdp_min_gib * 2**30
    mesh = subgroup_mesh(members, d.device) if shard and d.world > 1 else None  # collective: every rank
    if d.rank not in members:
        return None
    shard_fn = (lambda rm: QualityRewardModel.shard(rm, mesh)) if mesh is not None else None
    return QualityRewardModel.from_pretrained(r.quality_path, dtype=dtype, device=d.device,
                                              shard_fn=shard_fn).eval()
