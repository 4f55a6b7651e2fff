"""``bdbench perf``: speed measured as ratios against a reference in the same run, never asserted.

``coalitions``: scoring G channel-mask coalitions on N carriers, one coalition per forward pass (the
reference) against G x N images per pass at several pass sizes, on the same model and carriers. The
fastest pass size per device is what ``coalition_images`` in ``conf/config.yaml`` should hold.

``walks``: removal walks as ShapPruning scores them on the CPU, one coalition per forward pass: full passes (the
reference) against ``ResumedForward``, which recomputes only what the newly removed channel reaches; same model,
carriers and walks, and the logits checked equal.

``pipeline``: one epoch of poisoned training and one pass over the test set, the engine (uint8 data
resident on the device, batched augmentation) against the pipeline BackdoorBench runs (torchvision
DataLoader over PIL images, PIL transforms, fp32, batch 128), same poisoned data, model and initial weights.

``tta``: time to a clean test accuracy, the engine with its recipe against the same DataLoader + PIL pipeline
with BackdoorBench's recipe, on the same poisoned data and initial weights; test accuracy is measured after each
epoch, off the clock.

``allocator``: training steps on pre-made tensors in a fresh process with glibc's default allocator settings
against one that calls ``bdbench.device.retain_freed_memory`` first (as every ``bdbench`` process does), alternating.

``datapath``: the engine's training epoch and test pass divided by the model's own forward/backward (and
forward) time on pre-made float tensors of the same batch size, precision and memory format: what the
engine adds around the model (gather, uint8 scaling, poisoning, augmentation, bookkeeping), as a ratio.

``costs``: each defense's seconds per cell in a published grid's records, against the same cells' evaluation pass
(timed side by side in the runner) and an epoch of the model's own training timed in the run; only records from
this machine's CPU model and thread count count.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from bdbench.device import autocast, memory_format
from bdbench.figures import tta_curves
from bdbench.metrics import accuracy, predict
from bdbench.models import create_model
from bdbench.records import cpu_name
from bdbench.report import markdown
from bdbench.seeding import generator
from bdbench.train import train
from bdbench.validate import CONF_DIR, build
from bdbench.defenses.masks import (ResumedForward, coalition_logits, conv_neurons,  # shared machinery, not a defense
                            prefix_masks)

MODEL_SHAPES = {"fmnist_cnn": ((1, 28, 28), [0.5], [0.5]), "cifar_cnn": ((3, 32, 32), [0.5] * 3, [0.25] * 3),
                "preact_resnet18": ((3, 32, 32), [0.5] * 3, [0.25] * 3),
                "wrn16_1": ((3, 32, 32), [0.5] * 3, [0.25] * 3)}


@dataclass
class Result:
    """A benchmark's rows and the Markdown paragraph that says how to read them."""

    name: str
    rows: pd.DataFrame
    summary: str
    tag: str = ""  # in the file name, after the benchmark's (the data set of a pipeline run)
    plot: Callable[[pd.DataFrame, Path], None] | None = None  # draws the rows into a PNG beside the tables


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int, warmup: bool = True) -> float:
    """Best wall time of ``repeats`` calls of ``fn``."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _device_columns(df: pd.DataFrame, device: torch.device) -> pd.DataFrame:
    df.insert(0, "device", torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name())
    df.insert(1, "threads", torch.get_num_threads())
    return df


def coalitions(device: torch.device, models: list[str], carriers: list[int], n_coalitions: int,
               passes: list[int], repeats: int = 3, precision: str = "fp32") -> Result:
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
    df = _device_columns(pd.DataFrame(rows), device)
    batched = df[df["mode"] == "batched"]
    best = batched.groupby("images_per_pass")["speedup"].apply(lambda s: s.prod() ** (1 / len(s))).idxmax()
    summary = ("Speed-up = sequential time / batched time, same model, masks and carriers, best of the repeats.\n\n"
               f"Fastest pass size on average (geometric mean of speed-ups): **{best} images**.")
    shown = df.assign(coalitions_per_s=df["coalitions_per_s"].round(0), speedup=df["speedup"].round(2))
    return Result("Batched coalition scoring", shown, summary)


def _cell_both_ways(overrides: list[str]) -> dict:
    """One cell run twice in this process, resuming off (``RESUME_BELOW = 0``: the scoring before it) and then on:
    its defense seconds both ways and whether the two records' defense reports are the same apart from seconds."""
    import tempfile
    from unittest import mock

    import bdbench.defenses.masks as masks
    from bdbench import api

    reports, seconds = [], []
    for resume_below in (0, masks.RESUME_BELOW):
        with tempfile.TemporaryDirectory() as tmp, mock.patch.object(masks, "RESUME_BELOW", resume_below):
            record = api.run([*overrides, f"paths.records={tmp}", f"paths.output={tmp}/out", "worker.isolation=none"])
        if record["status"] != "ok":
            raise RuntimeError(f"{overrides}: {record['status']}: {record.get('error')}")
        reports.append({k: v for k, v in record["defense"].items() if k != "seconds"})
        seconds.append(record["timings"]["defense"])
    return {"cell": " ".join(o for o in overrides if not o.startswith("paths.")), "before_s": seconds[0],
            "resumed_s": seconds[1], "speedup": seconds[0] / seconds[1], "same_report": reports[0] == reports[1],
            "differs": ", ".join(k for k in reports[0] if reports[0][k] != reports[1].get(k)) or "-"}


def walks(device: torch.device, models: list[str], carriers: list[int], n_walks: int, steps: int,
          repeats: int = 3, cells: list[list[str]] = ()) -> Result:
    rows = []
    for name in models:
        shape, mean, std = MODEL_SHAPES[name]
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, shape=shape, mean=mean, std=std).to(device).eval()
        model = model.to(memory_format=torch.channels_last)  # as the grids' recipes leave it
        neurons = conv_neurons(model)
        gen = torch.Generator(device=device).manual_seed(0)
        masks = torch.cat([prefix_masks(torch.randperm(neurons.n, generator=gen, device=device),
                                        torch.arange(1, steps + 1, device=device), neurons.n) for _ in range(n_walks)])
        for n in carriers:
            x = torch.rand(n, *shape, generator=gen, device=device).contiguous(memory_format=torch.channels_last)

            def full() -> list[torch.Tensor]:
                return [coalition_logits(model, neurons, m[None], x, n)[0] for m in masks]

            def resumed() -> list[torch.Tensor]:
                with ResumedForward(model, neurons, x) as scorer:
                    return [scorer(m) for m in masks]

            if not all(torch.equal(a, b) for a, b in zip(full(), resumed())):
                raise AssertionError(f"{name}: resumed logits differ from full passes")
            t_full, t_resumed = _time(full, device, repeats), _time(resumed, device, repeats)
            rows.append({"model": name, "channels": neurons.n, "carriers": n, "coalitions": len(masks),
                         "full_ms": 1000 * t_full / len(masks), "resumed_ms": 1000 * t_resumed / len(masks),
                         "speedup": t_full / t_resumed})
    df = _device_columns(pd.DataFrame(rows), device)
    summary = (f"{n_walks} removal walks of {steps} steps each in a random channel order (a step removes one more "
               "channel), one coalition per forward pass; time per coalition, best of the repeats; speed-up = full / "
               "resumed. The logits of both were checked equal before timing.")
    shown = df.round({"full_ms": 2, "resumed_ms": 2, "speedup": 2})
    if cells:
        runs = pd.DataFrame([_cell_both_ways(list(c)) for c in cells]).round(
            {"before_s": 1, "resumed_s": 1, "speedup": 2})
        summary += ("\n\nWhole cells (the published cache's poisoned model, trigger reversal and synthetic set), each "
                    "run twice in one process, resuming off (the scoring before it: batched where coalitions fit a pass "
                    "together, else one full pass each) and then on; defense seconds; "
                    "`same_report`: the two records' defense reports (walks, estimates, guard curves, pruned channels) "
                    "are identical apart from their seconds; `differs`: the report keys that are not.\n\n"
                    + markdown(runs))
    return Result("Removal walks, full against resumed passes", shown, summary)



class PILImages(Dataset):
    """The reference data path: one PIL image per item through torchvision transforms (BackdoorBench)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: T.Compose) -> None:
        images = x.cpu().permute(0, 2, 3, 1).numpy()
        self.images = images[..., 0] if images.shape[-1] == 1 else images
        self.labels = y.cpu().tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(np.ascontiguousarray(self.images[i]))), self.labels[i]


def _reference_epoch(model: torch.nn.Module, loader: DataLoader, optimizer, device: torch.device) -> None:
    model.train()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def _reference_eval(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> None:
    model.eval()
    for x, _ in loader:
        model(x.to(device, non_blocking=True)).argmax(1)


def pipeline(device: torch.device, overrides: list[str], train_images: int | None, workers: list[int],
             batch_size: int = 128, repeats: int = 2) -> Result:
    """Seconds per training epoch and per test pass: the engine against DataLoader + PIL at each worker count."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    data = build(cfg.dataset).load(cfg.paths.data, device, cfg.paths.cache)
    spec = data.spec
    attack = build(cfg.attack)
    train_set = attack.prepare(data.train, data.poisonable(), generator(0, "poison"))
    if train_images is not None:
        train_set = train_set.subset(torch.arange(min(train_images, len(train_set)), device=device))
    recipe = replace(build(cfg.recipe), epochs=1, batch_size=batch_size, precision="fp32", channels_last=False)
    torch.manual_seed(0)
    engine_model = build(cfg.model, num_classes=spec.num_classes, shape=spec.shape, mean=spec.mean, std=spec.std)
    ones = [1.0] * len(spec.mean)
    torch.manual_seed(0)  # the same initial weights; the reference normalizes in its transforms instead
    reference_model = build(cfg.model, num_classes=spec.num_classes, shape=spec.shape, mean=[0.0] * len(ones), std=ones)
    reference_model.to(device)

    def engine_train() -> None:
        train(copy.deepcopy(engine_model), train_set, attack, recipe, spec.augment, generator(0, "train", device), "perf")

    def engine_eval() -> None:
        predict(engine_model.to(device), data.test.x, batch_size=recipe.eval_batch_size)

    normalize = T.Normalize(spec.mean, spec.std)
    augment = [T.RandomCrop(spec.shape[1], padding=spec.augment.crop_padding)] if spec.augment.crop_padding else []
    augment += [T.RandomHorizontalFlip()] if spec.augment.hflip else []
    n = len(train_set)
    rows = [{"phase": "train", "pipeline": "engine", "workers": "-", "images": n, "batch": batch_size,
             "seconds": _time(engine_train, device, repeats)},
            {"phase": "eval", "pipeline": "engine", "workers": "-", "images": len(data.test),
             "batch": recipe.eval_batch_size, "seconds": _time(engine_eval, device, repeats)}]
    pin = device.type == "cuda"
    for w in workers:
        train_loader = DataLoader(PILImages(train_set.x, train_set.y, T.Compose([*augment, T.ToTensor(), normalize])),
                                  batch_size=batch_size, shuffle=True, drop_last=True, num_workers=w, pin_memory=pin,
                                  persistent_workers=w > 0)
        test_loader = DataLoader(PILImages(data.test.x, data.test.y, T.Compose([T.ToTensor(), normalize])),
                                 batch_size=batch_size, num_workers=w, pin_memory=pin, persistent_workers=w > 0)

        def reference_train() -> None:
            model = copy.deepcopy(reference_model)
            _reference_epoch(model, train_loader, recipe.optimizer(model.parameters()), device)

        rows.append({"phase": "train", "pipeline": "DataLoader + PIL", "workers": w, "images": n, "batch": batch_size,
                     "seconds": _time(reference_train, device, repeats)})
        rows.append({"phase": "eval", "pipeline": "DataLoader + PIL", "workers": w, "images": len(data.test),
                     "batch": batch_size, "seconds": _time(lambda: _reference_eval(reference_model, test_loader, device),
                                                           device, repeats)})
    df = pd.DataFrame(rows)
    df["images_per_s"] = (df["images"] / df["seconds"]).round(0).astype(int)
    engine = df[df["pipeline"] == "engine"].set_index("phase")["seconds"]
    df["speedup"] = (df["seconds"] / df["phase"].map(engine)).round(2)  # engine speed-up over this row
    df["seconds"] = df["seconds"].round(3)
    df = _device_columns(df, device)
    ref = df[df["pipeline"] != "engine"]
    train_best = ref[ref["phase"] == "train"]["speedup"].min()
    eval_best = ref[ref["phase"] == "eval"]["speedup"].min()
    summary = (f"Data set {spec.name}, model {cfg.model._target_.rsplit('.', 1)[-1]}, attack "
               f"{cfg.attack._target_.rsplit('.', 1)[-1]}, {n} training images, fp32, batch {batch_size}; best of "
               f"{repeats} after a warm-up. `speedup` = this row's seconds / the engine's seconds for the same phase. "
               f"Against the fastest reference setting the engine is **{train_best:.2f}x** faster per training epoch "
               f"and **{eval_best:.2f}x** per test pass (engine eval batch {recipe.eval_batch_size}).")
    return Result("Engine against a DataLoader + PIL pipeline", df, summary, tag=spec.name)


def tta(device: torch.device, overrides: list[str], engine_recipe: str, reference_recipe: str, targets: list[float],
        max_epochs: int, max_seconds: float | None, train_images: int | None, test_images: int | None,
        workers: int) -> Result:
    """Seconds of training until the clean test accuracy first reaches each of ``targets``, per pipeline. A pipeline
    stops at the highest target, at ``max_epochs`` or after ``max_seconds`` of training, whichever comes first."""
    targets = sorted(targets)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"recipe={engine_recipe}"])
        reference = build(compose("config", overrides=[*overrides, f"recipe={reference_recipe}"]).recipe)
    data = build(cfg.dataset).load(cfg.paths.data, device, cfg.paths.cache)
    spec, attack = data.spec, build(cfg.attack)
    train_set = attack.prepare(data.train, data.poisonable(), generator(0, "poison"))
    if train_images is not None:
        train_set = train_set.subset(torch.arange(min(train_images, len(train_set)), device=device))
    test = data.test.subset(torch.arange(min(test_images or len(data.test), len(data.test)), device=device))
    recipe = build(cfg.recipe)
    rows = []

    def on_epoch(pipeline: str, epoch: int, seconds: float, acc: float) -> bool:
        rows.append({"pipeline": pipeline, "epoch": epoch, "seconds": seconds, "test_acc": acc})
        print(f"tta {pipeline}: epoch {epoch}, {seconds:.0f} s trained, clean test ACC {100 * acc:.2f} %", flush=True)
        return acc >= targets[-1] or epoch >= max_epochs or (max_seconds is not None and seconds >= max_seconds)

    torch.manual_seed(0)
    engine_model = build(cfg.model, num_classes=spec.num_classes, shape=spec.shape, mean=spec.mean, std=spec.std)
    torch.manual_seed(0)  # the same initial weights; the reference normalizes in its transforms instead
    ones = [1.0] * len(spec.mean)
    reference_model = build(cfg.model, num_classes=spec.num_classes, shape=spec.shape, mean=[0.0] * len(ones),
                            std=ones).to(device)
    clock = [0.0]

    def engine_epoch(row: dict, model: torch.nn.Module) -> bool:
        clock[0] += row["seconds"]
        return on_epoch(f"engine, recipe {engine_recipe}", row["epoch"], clock[0],
                        accuracy(model, test, batch_size=recipe.eval_batch_size))

    train(engine_model, train_set, attack, recipe, spec.augment, generator(0, "train", device), "tta", engine_epoch)

    normalize = T.Normalize(spec.mean, spec.std)
    augment = [T.RandomCrop(spec.shape[1], padding=spec.augment.crop_padding)] if spec.augment.crop_padding else []
    augment += [T.RandomHorizontalFlip()] if spec.augment.hflip else []
    loader = DataLoader(PILImages(train_set.x, train_set.y, T.Compose([*augment, T.ToTensor(), normalize])),
                        batch_size=reference.batch_size, shuffle=True, drop_last=reference.drop_last,
                        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    test_loader = DataLoader(PILImages(test.x, test.y, T.Compose([T.ToTensor(), normalize])), batch_size=1024)
    optimizer = reference.optimizer(reference_model.parameters())
    scheduler = reference.scheduler(optimizer) if reference.scheduler is not None else None
    seconds = 0.0
    for epoch in range(1, reference.epochs + 1):
        _sync(device)
        start = time.perf_counter()
        _reference_epoch(reference_model, loader, optimizer, device)
        if scheduler is not None:
            scheduler.step()
        _sync(device)
        seconds += time.perf_counter() - start
        if on_epoch(f"DataLoader + PIL, recipe {reference_recipe}", epoch, seconds,
                    _reference_accuracy(reference_model, test_loader, device)):
            break
    df = pd.DataFrame(rows)
    df["seconds"], df["test_acc"] = df["seconds"].round(1), df["test_acc"].round(4)
    names = df["pipeline"].unique()  # engine first, then the reference
    parts = []
    for target in targets:
        reached = df[df["test_acc"] >= target].groupby("pipeline", sort=False)["seconds"].min()
        lines = []
        for pipeline, group in df.groupby("pipeline", sort=False):
            if pipeline in reached:
                lines.append(f"{pipeline}: **{reached[pipeline]:.0f} s** "
                             f"({group['epoch'][group['test_acc'] >= target].min()} epochs)")
            else:
                lines.append(f"{pipeline}: not reached in {group['epoch'].max()} epochs "
                             f"({group['seconds'].max():.0f} s; best {100 * group['test_acc'].max():.2f} %)")
        if len(reached) == 2:
            ratio = f"; the reference takes **{reached[names[1]] / reached[names[0]]:.2f}x** the engine's time"
        elif len(names) == 2 and names[0] in reached:
            ratio = f"; the reference takes more than **{df['seconds'][df['pipeline'] == names[1]].max() / reached[names[0]]:.2f}x**"
        else:
            ratio = ""
        parts.append(f"Time to {100 * target:.0f} %: " + "; ".join(lines) + ratio + ".")
    summary = (f"Data set {spec.name}, model {cfg.model._target_.rsplit('.', 1)[-1]}, attack "
               f"{cfg.attack._target_.rsplit('.', 1)[-1]}, {len(train_set)} training images, clean test accuracy on "
               f"{len(test)} test images after each epoch (off the clock), same poisoned data and initial weights; "
               f"each pipeline stops at {100 * targets[-1]:.0f} %, after {max_epochs} epochs"
               + (f" or {max_seconds:.0f} s of training" if max_seconds is not None else "") + ". " + " ".join(parts))
    return Result(f"Time to {', '.join(f'{100 * t:.0f}' for t in targets)} % clean accuracy",
                  _device_columns(df, device), summary, tag=spec.name, plot=partial(tta_curves, targets=targets))


@torch.no_grad()
def _reference_accuracy(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = sum((model(x.to(device)).argmax(1).cpu() == y).sum().item() for x, y in loader)
    return correct / len(loader.dataset)


def own_compute(model: torch.nn.Module, spec, recipe, device: torch.device, steps: int, test_images: int
                ) -> tuple[Callable[[], None], Callable[[], None]]:
    """The model's own training steps and test pass on pre-made float tensors, with the recipe's batch sizes,
    optimizer, precision and memory format: what the model itself costs, with nothing of the engine around it."""
    fmt = memory_format(recipe.channels_last)
    model.to(device=device, memory_format=fmt)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.rand(recipe.batch_size, *spec.shape, generator=gen, device=device).contiguous(memory_format=fmt),
                torch.randint(spec.num_classes, (recipe.batch_size,), generator=gen, device=device))
               for _ in range(steps)]
    test_batches = [torch.rand(min(recipe.eval_batch_size, test_images - start), *spec.shape, generator=gen,
                               device=device).contiguous(memory_format=fmt)
                    for start in range(0, test_images, recipe.eval_batch_size)]

    def train_steps() -> None:
        own = copy.deepcopy(model).train()
        optimizer = recipe.optimizer(own.parameters())
        for x, y in batches:
            with autocast(device, recipe.precision):
                loss = F.cross_entropy(own(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def test_pass() -> None:
        model.eval()
        for x in test_batches:
            with autocast(device, recipe.precision):
                model(x).argmax(1)

    return train_steps, test_pass


def datapath(device: torch.device, cases: list[dict], repeats: int = 2) -> Result:
    """Per case (config overrides, training and test images): engine seconds / the model's own seconds."""
    rows = []
    for case in cases:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=list(case["overrides"]))
        data = build(cfg.dataset).load(cfg.paths.data, device, cfg.paths.cache)
        spec, attack = data.spec, build(cfg.attack)
        train_set = attack.prepare(data.train, data.poisonable(), generator(0, "poison"))
        train_set = train_set.subset(torch.arange(min(case.get("train_images") or len(train_set), len(train_set)),
                                                  device=device))
        test_x = data.test.x[: case.get("test_images") or len(data.test)]
        recipe = replace(build(cfg.recipe), epochs=1)
        torch.manual_seed(0)
        model = build(cfg.model, num_classes=spec.num_classes, shape=spec.shape, mean=spec.mean, std=spec.std)
        steps = len(train_set) // recipe.batch_size if recipe.drop_last else -(-len(train_set) // recipe.batch_size)
        own_train, own_eval = own_compute(model, spec, recipe, device, steps, len(test_x))

        def engine_train() -> None:
            train(copy.deepcopy(model), train_set, attack, recipe, spec.augment, generator(0, "train", device), "perf")

        def engine_eval() -> None:
            predict(model, test_x, batch_size=recipe.eval_batch_size, precision=recipe.precision)

        name = cfg.model._target_.rsplit(".", 1)[-1]
        for phase, engine, own, images, batch in [
                ("train", engine_train, own_train, steps * recipe.batch_size, recipe.batch_size),
                ("eval", engine_eval, own_eval, len(test_x), recipe.eval_batch_size)]:
            # alternate engine and model so that a change of load on the machine hits both alike
            e, o = [], []
            for _ in range(repeats):
                e.append(_time(engine, device, 1, warmup=not e))
                o.append(_time(own, device, 1, warmup=not o))
            rows.append({"data": spec.name, "model": name, "attack": cfg.attack._target_.rsplit(".", 1)[-1],
                         "phase": phase, "images": images, "batch": batch, "precision": recipe.precision,
                         "engine_s": min(e), "model_s": min(o), "ratio": min(e) / min(o)})
    df = _device_columns(pd.DataFrame(rows), device)
    worst = df.loc[df["ratio"].idxmax()]
    summary = ("`ratio` = the engine's seconds / the model's own seconds on pre-made float tensors (same model, "
               "initial weights, batch, optimizer, precision and memory format), best of "
               f"{repeats} alternating runs after a warm-up; the goal is <= 1.10. Highest: **{worst['ratio']:.2f}x** "
               f"({worst['model']}, {worst['phase']}).")
    shown = df.assign(**{c: df[c].map(lambda v: float(f"{v:.4g}")) for c in ("engine_s", "model_s", "ratio")})
    return Result("Engine data path against the model's own compute", shown, summary)


OWN_PHASES = ("data", "train", "defense", "eval", "oracle", "total")  # a record's timings that are not defense inputs


def defense_seconds(folder: Path, cpu: str, threads: int) -> tuple[pd.DataFrame, int]:
    """(one row per finished cell of ``folder``'s records timed on this CPU model with this many threads: defense,
    budget, defense seconds; how many finished cells were timed elsewhere and left out)."""
    rows, elsewhere = [], 0
    for path in sorted(Path(folder).glob("*.json")):
        rec = json.loads(path.read_text())
        if rec.get("status") != "ok":
            continue
        where = rec["env"]["device"]
        if where.get("cpu") != cpu or where.get("threads") != threads or where.get("type") != "cpu":
            elsewhere += 1
            continue
        rows.append({"defense": rec["display"]["defense"], "budget": str(rec["cell"]["budget"]),
                     "seconds": rec["timings"]["defense"],
                     "per_eval": rec["timings"]["defense"] / rec["timings"]["eval"],
                     # steps the runner does for the defense: synthesis at k = 0, shared steps such as the trigger
                     # reversal (paid by the first cell of a model and budget, read from the cache by the others)
                     "before_s": sum(v for k, v in rec["timings"].items() if k not in OWN_PHASES)})
    return pd.DataFrame(rows), elsewhere



def costs(device: torch.device, cases: list[dict], repeats: int = 2) -> Result:
    """Per case (config overrides, a records folder): each defense's median seconds per cell at each budget, from
    the records timed on this machine's CPU model, as a multiple of the same cells' own test passes and of one epoch
    of the model's own training (forward, backward and optimizer step over the training set) timed in this run."""
    if device.type != "cpu":
        raise ValueError("bdbench perf costs reads CPU-timed records: device=cpu")
    from bdbench.columns import budget_key

    tables, notes = [], []
    for case in cases:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=list(case["overrides"]))
        data = build(cfg.dataset).load(cfg.paths.data, device, cfg.paths.cache)
        spec, recipe = data.spec, build(cfg.recipe)
        torch.manual_seed(0)
        model = build(cfg.model, num_classes=spec.num_classes, shape=spec.shape, mean=spec.mean, std=spec.std)
        steps = case["steps"]
        own_train, _ = own_compute(model, spec, recipe, device, steps, test_images=0)  # training steps only
        epoch = _time(own_train, device, repeats) * len(data.train) / (steps * recipe.batch_size)
        cells, elsewhere = defense_seconds(Path(case["records"]), cpu_name(), torch.get_num_threads())
        if cells.empty:
            notes.append(f"{case['records']}: no finished cell timed on this CPU ({elsewhere} elsewhere)")
            continue
        name = cfg.model._target_.rsplit(".", 1)[-1]
        groups = cells.groupby(["defense", "budget"])
        table = (groups["seconds"].agg(["count", "median", "min", "max", "sum"]).reset_index()
                 .rename(columns={"count": "cells", "median": "median_s", "min": "min_s", "max": "max_s",
                                  "sum": "total_min"}))
        table["total_min"] /= 60
        table["inputs_min"] = groups["before_s"].sum().to_numpy() / 60
        table["eval_passes"] = groups["per_eval"].median().to_numpy()
        table["epochs"] = table["median_s"] / epoch
        table.insert(0, "records", str(case["records"]))
        table.insert(1, "model", name)
        table = table.sort_values(["defense", "budget"], key=lambda c: c.map(budget_key) if c.name == "budget" else c)
        tables.append(table)
        notes.append(f"{case['records']} ({name}, {spec.name}): one epoch of the model's own training = "
                     f"**{epoch:.4g} s** ({len(data.train)} images, batch {recipe.batch_size}, fp32 on the CPU, "
                     f"timed on {steps} steps); "
                     f"{len(cells)} finished cells timed on this CPU, {elsewhere} elsewhere (left out)")
    df = _device_columns(pd.concat(tables, ignore_index=True), device) if tables else _device_columns(
        pd.DataFrame(columns=["records"]), device)
    summary = ("A defense's seconds per cell (the record's `timings.defense`: the defense alone, after the inputs the "
               "runner made for it, before evaluation), median over the cells of each defense and budget that ran on "
               "this CPU model with this many threads. `eval_passes` = the median over cells of the defense's "
               "seconds / the same cell's evaluation seconds (the runner's clean and triggered test passes, same "
               "process and machine, right after the defense): the cost in forward passes over the test set, a "
               "ratio measured side by side. `epochs` = median_s / one epoch of the model's own training (forward, "
               "backward, optimizer step on pre-made tensors) timed in this run: a CPU model name covers machines "
               "of different speed, so it is an estimate across runs. `total_min` = all its cells' defense "
               "minutes; `inputs_min` = the minutes the runner spent on those cells' inputs before the defense "
               "(budget-0 synthesis; the shared trigger reversal, paid by the first cell of a model and budget and "
               f"read from the cache by the others). Model timings: best of {repeats}.\n\n"
               + "\n".join(f"- {n}" for n in notes))
    shown = df.assign(**{c: df[c].map(lambda v: float(f"{v:.3g}")) for c in df.columns
                         if c.endswith(("_s", "_min")) or c in ("epochs", "eval_passes")})
    return Result("Defense cost per cell against the model's own test passes and training", shown, summary)


ALLOCATOR_STEPS = """
import resource, sys, time
import torch, torch.nn.functional as F
from hydra import compose, initialize_config_dir
from bdbench.device import retain_freed_memory
from bdbench.validate import CONF_DIR, build
mode, model, dataset, batch, steps, threads = sys.argv[1:7]
if mode == "retain":
    assert retain_freed_memory()
torch.set_num_threads(int(threads))
with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
    cfg = compose("config", overrides=[f"model={model}", f"dataset={dataset}"])
d = cfg.dataset
torch.manual_seed(0)
net = build(cfg.model, num_classes=d.num_classes, shape=tuple(d.shape), mean=list(d.mean), std=list(d.std)).train()
optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
x, y = torch.rand(int(batch), *d.shape), torch.randint(d.num_classes, (int(batch),))
def step():
    loss = F.cross_entropy(net(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
step()
before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(int(steps)):
    step()
seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
print(seconds, after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt)
"""


def allocator(device: torch.device, cases: list[dict], images: int, repeats: int = 2) -> Result:
    """Per case (model, data set, batch): seconds per ``images`` training images, kernel seconds and page faults,
    glibc's defaults against ``retain_freed_memory``, each in a fresh process, best of ``repeats`` alternating runs."""
    if device.type != "cpu":
        raise ValueError("bdbench perf allocator measures host memory: device=cpu")
    rows = []
    for case in cases:
        steps = max(1, images // case["batch"])
        runs: dict[str, list[tuple[float, float, int]]] = {"default": [], "retain": []}
        for _ in range(repeats):
            for mode in runs:
                out = subprocess.run([sys.executable, "-c", ALLOCATOR_STEPS, mode, case["model"], case["dataset"],
                                      str(case["batch"]), str(steps), str(torch.get_num_threads())],
                                     capture_output=True, text=True, check=True).stdout.split()
                runs[mode].append((float(out[0]), float(out[1]), int(out[2])))
        best = {mode: min(r) for mode, r in runs.items()}
        rows.append({"model": case["model"], "batch": case["batch"], "images": steps * case["batch"],
                     **{f"{mode}_s": best[mode][0] for mode in runs}, **{f"{mode}_sys_s": best[mode][1] for mode in runs},
                     **{f"{mode}_faults": best[mode][2] for mode in runs},
                     "speed-up": best["default"][0] / best["retain"][0]})
    df = _device_columns(pd.DataFrame(rows), device)
    summary = (f"Training steps (SGD, fp32) on pre-made tensors, {images} images per run, each run a fresh process; "
               "`default_*`: glibc's allocator settings, `retain_*`: after `bdbench.device.retain_freed_memory()` "
               "(every bdbench process calls it); `*_sys_s` kernel time, `*_faults` minor page faults; best of "
               f"{repeats} alternating runs. `speed-up` = default seconds / retain seconds.")
    shown = df.assign(**{c: df[c].map(lambda v: float(f"{v:.4g}")) for c in df.columns if c.endswith("_s") or
                         c == "speed-up"})
    return Result("Host allocator: glibc's defaults against retained freed memory", shown, summary)


def write(result: Result, name: str, folder: Path, device: torch.device) -> Path:
    """``NAME[-TAG]-DEVICE.csv`` and ``.md`` under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / "-".join(filter(None, [name, result.tag, device.type]))
    result.rows.to_csv(stem.with_suffix(".csv"), index=False, float_format="%.4g")
    df = result.rows
    text = (f"# {result.name} ({device.type})\n\nTorch {torch.__version__}, {df['threads'].iloc[0]} threads, "
            f"device {df['device'].iloc[0]}. {result.summary}\n\n" + markdown(df.drop(columns=["device", "threads"])))
    if result.plot is not None:
        result.plot(df, stem.with_suffix(".png"))
        text += f"\n![{result.name}]({stem.with_suffix('.png').name})\n"
    stem.with_suffix(".md").write_text(text)
    return stem.with_suffix(".md")
