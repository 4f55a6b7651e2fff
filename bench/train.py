"""Training a (poisoned) model: one loop over device-resident uint8 tensors.

Per step: gather a batch of uint8 images, scale to [0, 1], hand it to the attack's ``train_batch``
hook together with the data set's augmentation (so each attack decides whether it poisons before or
after augmenting), forward, cross-entropy plus the attack's ``batch_loss``, step, and let the attack
step its own optimizers. The scheduler steps once per epoch (BackdoorBench). An attack with networks
of its own fits them first in ``before_training``.

Training resumes: given a ``checkpoint`` (the runner's is a verified cache entry), the whole training state
(model, optimizer, scheduler, the generator, the batch order, the attack's own state) is saved after every
epoch and, when found at the start, restored, so a run killed after epoch k continues at k + 1 and ends with
the weights an uninterrupted run would have (a CPU model of an hour or more survives the end of a session).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Callable, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bdbench.augment import Augment
from bdbench.data import ImageSet
from bdbench.device import PRECISIONS, autocast, memory_format
from bdbench.schema import PositiveInt, Range

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Recipe:
    """A training recipe (``conf/recipe``): results always name the recipe they used."""

    epochs: PositiveInt
    batch_size: PositiveInt
    optimizer: Callable[..., torch.optim.Optimizer]
    scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None
    precision: Literal[PRECISIONS]
    channels_last: bool
    drop_last: bool  # steps per epoch: floor(n / batch) when true, else ceil
    eval_batch_size: PositiveInt
    label_smoothing: Annotated[float, Range(ge=0, lt=1)] | None  # null = none (BackdoorBench)


class BatchStream:
    """Index batches over ``n`` items drawn from seeded permutations, each used up before the next starts (a
    batch may span two): the one way the trainer, fine-tuning and attacks with their own networks draw batches."""

    def __init__(self, n: int, gen: torch.Generator, device: torch.device) -> None:
        self.n, self.gen = n, gen
        self.order = torch.empty(0, dtype=torch.long, device=device)

    def take(self, size: int) -> torch.Tensor:
        while len(self.order) < size:
            fresh = torch.randperm(self.n, generator=self.gen, device=self.gen.device).to(self.order.device)
            self.order = torch.cat([self.order, fresh])
        idx, self.order = self.order[:size], self.order[size:]
        return idx


class Checkpoint(Protocol):
    """Where ``train`` keeps its state between epochs: ``load()`` gives the last saved state or None."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...


def default_rng_state(device: torch.device) -> torch.Tensor:
    """The state of torch's default generator on ``device`` (what dropout draws from)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_default_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def train(model: nn.Module, data: ImageSet, attack, recipe: Recipe, augment: Augment,
          gen: torch.Generator, desc: str = "train",
          on_epoch: Callable[[dict, nn.Module], bool | None] | None = None,
          checkpoint: Checkpoint | None = None) -> list[dict]:
    """Train ``model`` in place on ``data`` through ``attack.train_batch``; return per-epoch metrics.

    ``on_epoch(row, model)`` runs after each epoch, outside its timing (``bdbench perf tta`` measures test
    accuracy there); a true return ends training early. Each row's ``elapsed`` is the training time so far,
    ``on_epoch`` excluded, summed over resumed runs (each of which fits the attack's own networks again)."""
    begun = time.perf_counter()
    device = data.x.device
    fmt = memory_format(recipe.channels_last)
    model.to(device=device, memory_format=fmt)
    optimizer = recipe.optimizer(model.parameters())
    scheduler = recipe.scheduler(optimizer) if recipe.scheduler is not None else None
    n = len(data)
    steps = n // recipe.batch_size if recipe.drop_last else -(-n // recipe.batch_size)
    attack.before_training(data, partial(augment, gen=gen), gen, recipe)
    stream = BatchStream(n, gen, device)
    history, prior, outside = [], 0.0, 0.0  # prior: training seconds of resumed runs; outside: in on_epoch
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        gen.set_state(saved["gen"])
        set_default_rng_state(saved["default_rng"], device)  # dropout draws from torch's default generator
        stream.order = saved["order"].to(device)
        attack.load_training_state(saved["attack"])
        history = saved["history"]
        prior = history[-1]["elapsed"]
        log.info("%s resumes after epoch %d of %d", desc, len(history), recipe.epochs)
    first = len(history)
    for epoch in range(first, recipe.epochs):
        start = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        bar = tqdm(range(steps), desc=f"{desc} {epoch + 1}/{recipe.epochs}", leave=False, disable=None)
        for step in bar:
            idx = stream.take(recipe.batch_size)
            x = data.x[idx].float().div_(255)
            y = data.y[idx]
            x, y = attack.train_batch(x, y, partial(augment, gen=gen))
            x = x.contiguous(memory_format=fmt)
            with autocast(device, recipe.precision):
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing or 0.0) + attack.batch_loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            attack.after_step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}")
        if scheduler is not None:
            scheduler.step()
        attack.after_epoch()
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(f"{desc}: the loss became {loss_sum.item()} in epoch {epoch + 1}; training diverged")
        now = time.perf_counter()
        row = {"epoch": epoch + 1, "loss": loss_sum.item() / seen, "acc": correct.item() / seen,
               "lr": optimizer.param_groups[0]["lr"], "seconds": now - start, "elapsed": prior + now - begun - outside}
        if saved is not None and epoch == first:
            row["resumed"] = True  # this run began here: its ``elapsed`` includes fitting the attack's networks again
        history.append(row)
        log.info("%s epoch %d/%d  loss %.4f  acc %.4f  (%.1f s)", desc, row["epoch"], recipe.epochs,
                 row["loss"], row["acc"], row["seconds"])
        stop = on_epoch is not None and on_epoch(row, model)
        outside += time.perf_counter() - now
        if stop:
            break
        if checkpoint is not None and epoch + 1 < recipe.epochs:
            checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict() if scheduler is not None else None,
                             "gen": gen.get_state(), "default_rng": default_rng_state(device), "order": stream.order,
                             "attack": attack.training_state(),
                             "history": history})
    return history
