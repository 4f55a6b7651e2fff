"""``bdbench perf``: speed measured as ratios against a reference in the same run, never asserted.

``coalitions``: scoring G channel-mask coalitions on N carriers, one coalition per forward pass (the
reference) against G x N images per pass at several pass sizes, on the same model and carriers. The
fastest pass size per device is what ``coalition_images`` in ``conf/config.yaml`` should hold.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import pandas as pd
import torch

from bench.models import create_model
from bench.report import markdown
from defenses.masks import coalition_logits, conv_neurons  # shared machinery, not a concrete defense

MODEL_SHAPES = {"fmnist_cnn": ((1, 28, 28), [0.5], [0.5]), "cifar_cnn": ((3, 32, 32), [0.5] * 3, [0.25] * 3),
                "preact_resnet18": ((3, 32, 32), [0.5] * 3, [0.25] * 3)}


def _time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def coalitions(device: torch.device, models: list[str], carriers: list[int], n_coalitions: int,
               passes: list[int], repeats: int = 3, precision: str = "fp32") -> pd.DataFrame:
    rows = []
    for name in models:
        shape, mean, std = MODEL_SHAPES[name]
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, shape=shape, mean=mean, std=std).to(device).eval()
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        neurons = conv_neurons(model)
        gen = torch.Generator(device=device).manual_seed(0)
        masks = (torch.rand(n_coalitions, neurons.n, generator=gen, device=device) > 0.01).float()
        for n in carriers:
            x = torch.rand(n, *shape, generator=gen, device=device)
            seq = _time(lambda: coalition_logits(model, neurons, masks, x, n, precision), device, repeats)
            rows.append({"model": name, "carriers": n, "images_per_pass": n, "mode": "sequential",
                         "coalitions_per_s": n_coalitions / seq, "speedup": 1.0})
            for per_pass in passes:
                if per_pass <= n:
                    continue
                t = _time(lambda: coalition_logits(model, neurons, masks, x, per_pass, precision), device, repeats)
                rows.append({"model": name, "carriers": n, "images_per_pass": per_pass, "mode": "batched",
                             "coalitions_per_s": n_coalitions / t, "speedup": seq / t})
    df = pd.DataFrame(rows)
    df.insert(0, "device", torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu")
    df.insert(1, "threads", torch.get_num_threads())
    return df


def write(df: pd.DataFrame, folder: Path, device: torch.device) -> Path:
    """CSV and Markdown, with the pass size that is fastest on average over the carrier counts."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"coalitions-{device.type}"
    df.to_csv(stem.with_suffix(".csv"), index=False, float_format="%.4g")
    batched = df[df["mode"] == "batched"]
    best = batched.groupby("images_per_pass")["speedup"].apply(lambda s: s.prod() ** (1 / len(s))).idxmax()
    shown = df.assign(coalitions_per_s=df["coalitions_per_s"].round(0), speedup=df["speedup"].round(2))
    text = (f"# Batched coalition scoring ({device.type})\n\nTorch {torch.__version__}, {df['threads'].iloc[0]} threads, "
            f"device {df['device'].iloc[0]}. Speed-up = sequential time / batched time, same model, masks and carriers, "
            f"best of the repeats.\n\nFastest pass size on average (geometric mean of speed-ups): **{best} images**.\n\n"
            + markdown(shown.drop(columns=["device", "threads"])))
    stem.with_suffix(".md").write_text(text)
    return stem.with_suffix(".md")
