"""Metrics: JSONL log, one-line progress, MFU, NVML memory/utilisation.

MFU = achieved model FLOP/s / peak FLOP/s of the GPUs. Achieved FLOPs of a step are counted per
trained sequence with lwz.model.model_flops_per_token (6 x matmul params per token for
forward+backward, plus causal attention 12 * layers * heads * head_dim * (L + 1) / 2 per token),
times the number of forward/backward passes actually run. Peak: bf16 dense of the detected GPU
(H100/H200 989 TF/s, A100 312 TF/s), or `None` (MFU not reported) when unknown, e.g. on CPU.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_BF16.items():
        if key in name:
            return val
    return None


class NVML:
    """GPU memory and utilisation through nvidia-ml-py; silently empty where there is no GPU."""

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.pynvml = pynvml
            # by PCI address: NVML numbers GPUs ignoring CUDA_VISIBLE_DEVICES, torch does not
            p = torch.cuda.get_device_properties(device)
            try:
                self.handle = pynvml.nvmlDeviceGetHandleByPciBusId(
                    f"{p.pci_domain_id:08X}:{p.pci_bus_id:02X}:{p.pci_device_id:02X}.0".encode())
            except Exception:  # right when all GPUs are visible
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:
            self.handle = None

    def read(self) -> dict:
        if self.handle is None:
            return {}
        mem = self.pynvml.nvmlDeviceGetMemoryInfo(self.handle)
        util = self.pynvml.nvmlDeviceGetUtilizationRates(self.handle)
        return {"gpu_mem_used_gb": mem.used / 2**30, "gpu_util": float(util.gpu)}


class MetricsLog:
    """Appends one JSON object per step to `path` (rank 0 only) and prints a compact line."""

    # the progress line's values (those present in a row)
    SHOWN = ("reward_total", "reward_length", "reward_format", "reward_quality", "answer_words_mean", "kl_mean",
             "entropy", "grad_norm")

    def __init__(self, path: str, enabled: bool, progress: bool = True, total_steps: int = 0, shown=SHOWN):
        self.path, self.enabled, self.progress, self.total = path, enabled, progress, total_steps
        self.shown_keys = tuple(shown)
        self.t0 = time.time()
        if enabled:
            os.makedirs(os.path.dirname(path), exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps after the checkpoint, so the log matches the state. A
        line cut short by a kill mid-write (not JSON) is dropped too; the file is replaced atomically."""
        if not (self.enabled and os.path.exists(self.path)):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    row = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                 for k, v in row.items()}
        clean["step"] = int(row["step"])
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.progress:
            s = row["step"]
            bar = f"[{s:>4}/{self.total}]"
            parts = [f"{k}={row[k]:.3f}" for k in self.shown_keys if k in row and _finite(row[k])]
            parts.append(f"tok/s={row.get('tokens_per_s', 0):.0f}")
            parts.append(f"t={time.time() - self.t0:.0f}s")
            print(bar + " " + " ".join(parts), file=sys.stdout, flush=True)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


class Progress:
    """A one-line progress bar for long loops, `label  37%  1234/3300  12s`, redrawn in place at
    most every `every` seconds on `stream` (default stderr), and only when the stream is a
    terminal, so logs and pipes stay clean. update(n) adds n done units; close() ends the line."""

    def __init__(self, total: int, label: str, stream=None, every: float = 0.2):
        self.total, self.label, self.every = max(int(total), 0), label, every
        self.stream = sys.stderr if stream is None else stream
        self.on = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done, self.t0, self.shown = 0, time.time(), 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.time()
        if self.on and now - self.shown >= self.every:
            self.shown = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        pct = f"{100 * self.done / self.total:3.0f}%" if self.total else "   "
        self.stream.write(f"\r{self.label}  {pct}  {self.done}/{self.total}  {now - self.t0:.0f}s")
        self.stream.flush()

    def close(self) -> None:
        if self.on:
            self._draw(time.time())
            self.stream.write("\n")
            self.stream.flush()
