"""The trigger gallery: a few test images per data set, clean and triggered by every attack, with the
trigger residual magnified to full range (WaNet's and Input-aware's are invisible otherwise)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bdbench.data import DataBundle  # noqa: E402
from bdbench.validate import Cell  # noqa: E402


def pick_images(data: DataBundle, n: int) -> torch.Tensor:
    """The first test image of each of the first ``n`` classes."""
    idx = [int((data.test.y == c).nonzero()[0]) for c in range(min(n, data.spec.num_classes))]
    return data.test.x[idx]


def _show(ax, img: torch.Tensor) -> None:
    img = img.cpu()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def write_gallery(data: DataBundle, attacks: dict[str, object], path: Path, n_images: int = 6,
                  models: dict[str, torch.nn.Module] | None = None, source: str | None = None) -> Path:
    """One PNG: a clean row, then per attack a triggered row and a residual row. Under each triggered image, the
    attack's target label and, when its poisoned model is given, what that model predicts for the image.
    ``source`` (the digest of what it shows, ``bdbench.figures.digest``) goes into the PNG's metadata."""
    from bdbench.metrics import predict

    clean = pick_images(data, n_images)
    rows: list[tuple[str, torch.Tensor, list[str]]] = [("clean", clean, [f"label {int(y)}" for y in
                                                                         range(len(clean))])]
    for name, attack in attacks.items():
        triggered = attack.apply_trigger(clean)
        residual = (triggered.float() - clean.float()).abs()
        gain = 255.0 / max(float(residual.max()), 1.0)
        model = (models or {}).get(name)
        pred = predict(model.eval(), triggered).tolist() if model is not None else [None] * len(clean)
        wanted = attack.backdoor_labels(torch.arange(len(clean))).tolist()  # one image per class, in class order
        notes = [f"target {t}" + ("" if p is None else f", pred {p}") for t, p in zip(wanted, pred)]
        rows += [(name, triggered, notes),
                 (f"|residual| x{gain:.0f}", (residual * gain).round().to(torch.uint8), [""] * len(clean))]
    fig, axes = plt.subplots(len(rows), len(clean), figsize=(1.4 * len(clean), 1.55 * len(rows)), squeeze=False)
    for r, (label, images, notes) in enumerate(rows):
        for c in range(len(clean)):
            _show(axes[r][c], images[c])
            axes[r][c].set_xlabel(notes[c], fontsize=6.5, labelpad=2)
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{data.spec.name}: triggers", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, metadata={"Software": None, **({"Source": source} if source else {})})
    plt.close(fig)
    return path


def gallery(cells: dict[str, Cell]) -> Path:
    """Load (or train, if not cached) every attack's poisoned model for one data set and draw the gallery."""
    from bdbench.runner import poisoned_model

    first = next(iter(cells.values()))
    paths = first.cfg.paths
    data = first.dataset.load(paths.data, first.device, paths.cache)
    poisoned = {name: poisoned_model(cell, data) for name, cell in cells.items()}
    return write_gallery(data, {n: p[1] for n, p in poisoned.items()}, Path(paths.output) / "gallery" / f"{data.spec.name}.png",
                         models={n: p[0] for n, p in poisoned.items()})
