"""Why pruning one channel of cifar_cnn left a model that predicts one class (issue 15, item 6).

The published WaNet cells of this folder (code before issue 15) had ShapPruning (1 channel of 448) and CLP (4
channels) end at ACC 10.1 %. This script retrains that poisoned model under today's code (cifar_cnn, WaNet, the
20,000-image subset, reference recipe, 40 epochs, target 0, seed 0; the model cache keeps it), then compares
three ways of removing a channel, on the CLP set and on every single channel in turn:

- zero: the channel's BatchNorm output is 0 (CLP's gamma = beta = 0; ShapPruning's mask);
- mean: the channel outputs its mean BatchNorm output over the defender's clean images (gamma = 0, beta = mean);
- zero + BN: zero, then every BatchNorm's running statistics re-estimated on the defender's clean images.

It writes collapse.md beside itself. Run from the repository root (about 20 minutes on 2 CPU cores, most of it
training): python results/cifar10_jpeg_dynamic/collapse.py paths.data=../shared/data [overrides]
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch import nn

from bench.device import resolve_device
from bench.metrics import COLLAPSE_CHANCE_FACTOR, COLLAPSE_TOP_SHARE, evaluate, predict
from bench.report import markdown
from bench.runner import poisoned_model
from bench.validate import CONF_DIR, build

SETTING = ["experiment=cifar10_grid", "model=cifar_cnn", "recipe=reference", "attack=wanet",
           "dataset.subset.train=20000", "attack_target=0", "seed=0", "budget=10", "defense=clp"]
SWEEP_IMAGES = 500  # test images per single-channel check (the full test set for the CLP rows)


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [bn for _, bn in model.conv_bn_pairs()]


def locate(model: nn.Module, index: int) -> tuple[nn.BatchNorm2d, int]:
    for bn in bn_layers(model):
        if index < bn.num_features:
            return bn, index
        index -= bn.num_features
    raise IndexError(index)


@torch.no_grad()
def bn_output_means(model: nn.Module, x: torch.Tensor) -> dict[nn.BatchNorm2d, torch.Tensor]:
    """Per BatchNorm, the mean of its output channels over the images ``x`` (eval mode)."""
    means, hooks = {}, []
    for bn in bn_layers(model):
        hooks.append(bn.register_forward_hook(lambda m, _i, out: means.__setitem__(m, out.mean((0, 2, 3)))))
    model.eval()(x)
    for h in hooks:
        h.remove()
    return means


@torch.no_grad()
def remove(model: nn.Module, channels: list[int], mode: str, clean: torch.Tensor) -> nn.Module:
    """A copy of ``model`` without ``channels`` (global indices over the conv-BN pairs), by ``mode``."""
    out = copy.deepcopy(model)
    means = bn_output_means(out, clean) if mode == "mean" else {}
    for index in channels:
        bn, c = locate(out, index)
        bn.weight[c] = 0
        bn.bias[c] = means[bn][c] if mode == "mean" else 0
    if mode == "zero + BN":
        for bn in bn_layers(out):
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over the clean images
        out.train()(clean)
        out.eval()
    return out


@torch.no_grad()
def downstream_shift(model: nn.Module, pruned: nn.Module, clean: torch.Tensor) -> float:
    """The largest |batch mean - running mean| / running std over every BatchNorm input channel of ``pruned`` on
    the clean images: how far removing the channel moves the statistics BatchNorm normalizes by."""
    worst, hooks = [0.0], []

    def check(bn: nn.BatchNorm2d, inputs: tuple[torch.Tensor]) -> None:
        z = (inputs[0].mean((0, 2, 3)) - bn.running_mean).abs() / (bn.running_var + bn.eps).sqrt()
        worst[0] = max(worst[0], z.max().item())

    for bn in bn_layers(pruned):
        hooks.append(bn.register_forward_pre_hook(check))
    pruned.eval()(clean)
    for h in hooks:
        h.remove()
    return worst[0]


def verdict(acc: float, top: float, classes: int) -> bool:
    return acc <= COLLAPSE_CHANCE_FACTOR / classes or top >= COLLAPSE_TOP_SHARE


def main(overrides: list[str]) -> None:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*SETTING, *overrides])
    device = resolve_device(cfg.device)
    torch.set_grad_enabled(True)
    data = build(cfg.dataset).load(cfg.paths.data, device, cfg.paths.cache)
    model, attack, info = poisoned_model(cfg, data, device)
    model.eval()
    real = data.budget(int(cfg.budget), int(cfg.seed))
    clean = real.x.float().div(255)
    classes = data.spec.num_classes
    test = data.test  # class folders: the first images are all one class, so the sweep draws a seeded sample
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:SWEEP_IMAGES].to(test.x.device)
    sweep_x, sweep_y = test.x[pick], test.y[pick]

    def score(m: nn.Module, full: bool) -> dict:
        if full:
            metrics = evaluate(m, test, attack, 1024, "fp32")
            return {"acc": metrics["acc"], "asr": metrics["asr"], "top": metrics["top_class_share"]}
        pred = predict(m, sweep_x)
        return {"acc": (pred == sweep_y).float().mean().item(),
                "top": torch.bincount(pred, minlength=classes).max().item() / len(pred)}

    torch.set_grad_enabled(False)
    clp_model = copy.deepcopy(model)
    report = build(cfg.defense).repair(clp_model, None, None)
    sizes = [bn.num_features for bn in bn_layers(model)]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    clp = [offsets[layer] + c for layer, idx in enumerate(report["pruned_per_layer"]) for c in idx]
    rows = [{"channels": "none", "mode": "-", **score(model, True), "shift": downstream_shift(model, model, clean)}]
    for mode in ("zero", "mean", "zero + BN"):
        pruned = remove(model, clp, mode, clean)
        rows.append({"channels": f"CLP's {len(clp)}: {clp}", "mode": mode, **score(pruned, True),
                     "shift": downstream_shift(model, pruned, clean)})

    single = []
    for index in range(sum(sizes)):
        pruned = remove(model, [index], "zero", clean)
        single.append({"channel": index, **score(pruned, False)})
    collapsing = [s for s in single if verdict(s["acc"], s["top"], classes)]
    fixes = []
    for s in collapsing:
        row = {"channel": s["channel"], "zero ACC": s["acc"], "zero top share": s["top"],
               "shift": downstream_shift(model, remove(model, [s["channel"]], "zero", clean), clean)}
        for mode in ("mean", "zero + BN"):
            r = score(remove(model, [s["channel"]], mode, clean), False)
            row[f"{mode} ACC"], row[f"{mode} top share"] = r["acc"], r["top"]
        fixes.append(row)

    def pct(frame: list[dict]) -> list[dict]:
        return [{k: (f"{100 * v:.1f}" if isinstance(v, float) and k != "shift" else
                     f"{v:.1f}" if isinstance(v, float) else v) for k, v in r.items()} for r in frame]

    import pandas as pd

    text = [f"# Pruning collapse on `cifar_cnn` + WaNet (issue 15, item 6)", "",
            f"Written by `python {Path(__file__).relative_to(Path.cwd()) if Path(__file__).is_relative_to(Path.cwd()) else Path(__file__).name} "
            f"{' '.join(overrides)}`. Model: {' '.join(SETTING[:-2])} (cache key {info['key'][:12]}, "
            f"{'from the cache' if info['hit'] else 'trained now'}; undefended ACC {100 * info['undefended']['acc']:.1f} %, "
            f"ASR {100 * info['undefended']['asr']:.1f} %). Clean images: the defender's {len(clean)} (budget "
            f"{cfg.budget}). `shift`: the largest |batch mean - running mean| / running std over every BatchNorm "
            f"input channel on those images after the removal (the unpruned model's value is the sampling noise of "
            f"{len(clean)} images). "
            f"`top`: the share of the most predicted class. ACC, ASR, top in %.", "",
            "## CLP's channels, full test set", "", markdown(pd.DataFrame(pct(rows))), "",
            f"## Every single channel zeroed ({sum(sizes)} channels, {SWEEP_IMAGES} test images drawn with seed 0)", "",
            f"{len(collapsing)} of {sum(sizes)} single channels collapse the model when zeroed (ACC <= "
            f"{100 * COLLAPSE_CHANCE_FACTOR / classes:.0f} % or one class >= {100 * COLLAPSE_TOP_SHARE:.0f} % of the "
            f"predictions). Median ACC with one channel zeroed: "
            f"{100 * sorted(s['acc'] for s in single)[len(single) // 2]:.1f} %.", ""]
    if fixes:
        text += ["Each collapsing channel under the other two removals:", "", markdown(pd.DataFrame(pct(fixes))), ""]
    out = Path(__file__).with_name("collapse.md")
    out.write_text("\n".join(text))
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
