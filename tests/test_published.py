"""The published models against the current code (slow tier, real data): what ``bdbench.code_versions.ADMITTED`` rests
on. For every poisoned model in results/, from its cache entry and with the code as it is now: a static attack draws
the same poisoned indices and makes the same trigger, the cached trigger gives the same test images, and the weights
give the undefended metrics the entry recorded; and every published data set reads as the publishing code read it.
An admitted edit that changed any of these fails here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from bdbench.attacks.base import StaticPoisonAttack
from bdbench.cache import ModelCache
from bdbench.code_versions import PUBLISHED_DATA
from bdbench.data import DataBundle, ImageDataset
from bdbench.metrics import evaluate
from bdbench.report import current
from bdbench.seeding import generator
from bdbench.validate import build
from conftest import DATA

pytestmark = pytest.mark.slow

RESULTS = Path(__file__).resolve().parent.parent / "results"
MANIFESTS = sorted(RESULTS.glob("*/cache/models/*/manifest.json"))
FOLDERS = {"fashion_mnist": "fashion-mnist", "cifar10_jpeg": "cifar10-jpeg"}
CLOSE = 0.002  # of a metric: 20 of 10,000 test images, for another CPU's float path


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[f"{m.parts[-5]}-{m.parent.name[:8]}" for m in MANIFESTS])
def test_the_current_code_reproduces_each_published_models_poisoning_trigger_and_metrics(manifest):
    spec = json.loads(manifest.read_text())["spec"]
    folder = FOLDERS.get(spec["dataset"]["name"])
    if folder is None or not (DATA / folder).exists():
        pytest.skip(f"the files of {spec['dataset']['name']} are not under {DATA}")
    cache_root = manifest.parents[2]
    entry = ModelCache(cache_root).load(manifest.parent.name)
    if entry is None:
        pytest.skip("the entry's files are not in the working tree (.gitignore says how to restore them)")
    dataset = build({**spec["dataset"], "download": False})
    data = dataset.load(DATA, "cpu", cache_root)
    attack = current(spec["attack"])  # keys added since, at null: what the model was made with (NEUTRAL)
    cached = build(attack)
    cached.load_state_dict(entry.attack_state)
    fresh = build(attack)
    if isinstance(fresh, StaticPoisonAttack):
        fresh.prepare(data.train, data.poisonable(), generator(spec["seed"], "poison"))
        assert torch.equal(fresh.poison_indices, entry.attack_state["poison_indices"])
        assert state_equal(fresh.state_dict(), entry.attack_state)
        assert torch.equal(fresh.apply_trigger(data.test.x[:512]), cached.apply_trigger(data.test.x[:512]))
    model = build(spec["model"], num_classes=dataset.num_classes, shape=dataset.shape, mean=dataset.mean,
                  std=dataset.std)
    model.load_state_dict(entry.weights)
    metrics = evaluate(model, data.test, cached, precision=spec["precision"])
    recorded = entry.manifest["undefended"]
    for name in ("acc", "asr", "ra"):
        if recorded.get(name) is None:
            assert metrics.get(name) is None, name
        else:
            assert abs(metrics[name] - recorded[name]) <= CLOSE, (name, metrics[name], recorded[name])


def data_digest(dataset: ImageDataset, data: DataBundle) -> str:
    """Everything the data module hands a model and its cells: images, labels, pool, poisonable set, budgets."""
    parts = [data.train.x, data.train.y, data.test.x, data.test.y, data.pool, data.poisonable()]
    parts += [data.budget_indices(k, seed) for k in (1, 10, dataset.pool_per_class) for seed in (0, 1, 2)]
    digest = hashlib.sha256()
    for t in parts:
        t = t.contiguous().cpu()
        digest.update(f"{t.dtype}{list(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


DATASET_SPECS = {spec["name"]: spec for spec in (json.loads(m.read_text())["spec"]["dataset"] for m in MANIFESTS)}


@pytest.mark.parametrize("name", sorted(DATASET_SPECS))
def test_the_current_code_reads_each_published_data_set_as_the_publishing_code_did(name, tmp_path):
    if not (DATA / FOLDERS[name]).exists():
        pytest.skip(f"the files of {name} are not under {DATA}")
    dataset = build({**DATASET_SPECS[name], "download": False})
    data = dataset.load(DATA, "cpu", tmp_path)  # decoded afresh, not from a cache an earlier reader made
    assert data_digest(dataset, data) == PUBLISHED_DATA[name]
