"""BadNets and Blended triggers against their specs (docs/attack_methods.md §2, §3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bdbench.data import ImageSet
from conftest import configured


def test_badnets_square_on_28_and_32():
    for side, rows in ((28, range(25, 28)), (32, range(29, 32))):
        x = torch.zeros(2, 1, side, side, dtype=torch.uint8)
        out = configured("attack", "attack=badnets").apply_trigger(x)
        stamped = (out[0, 0] == 255).nonzero().tolist()
        assert stamped == [[r, c] for r in rows for c in rows]  # 9 pixels, flush bottom-right


def test_badnets_keeps_the_rest_of_the_image():
    x = torch.randint(0, 200, (3, 3, 32, 32), dtype=torch.uint8)
    out = configured("attack", "attack=badnets").apply_trigger(x)
    assert torch.equal(out[..., :29, :], x[..., :29, :])
    assert (out[..., 29:, 29:] == 255).all()


def test_blended_formula_by_hand():
    attack = configured("attack", "attack=blended", alpha=0.2, seed_K=0)
    x = torch.full((1, 1, 4, 4), 100, dtype=torch.uint8)
    out = attack.apply_trigger(x)
    k = np.random.default_rng(0).integers(0, 256, size=(4, 4, 1), dtype=np.uint8)[..., 0].astype(float)
    expected = np.clip(np.round(0.8 * 100 + 0.2 * k), 0, 255)
    assert np.array_equal(out[0, 0].numpy(), expected)


def test_static_poisoning_follows_the_backdoorbench_rule():
    train = ImageSet(torch.zeros(1000, 1, 8, 8, dtype=torch.uint8), torch.arange(1000) % 10)
    candidates = torch.arange(100, 1000)
    attack = configured("attack", "attack=badnets", target=3, poison_rate=0.1)
    poisoned = attack.prepare(train, candidates, torch.Generator().manual_seed(0))
    idx = attack.poison_indices
    assert len(idx) == 100 and len(set(idx.tolist())) == 100  # round(0.1 * N)
    assert (idx >= 100).all()  # never outside the candidates (the defender pool)
    assert (poisoned.y[idx] == 3).all() and (poisoned.x[idx][..., 5:, 5:] == 255).all()
    untouched = torch.ones(1000, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(poisoned.y[untouched], train.y[untouched]) and (poisoned.x[untouched] == 0).all()
    assert torch.bincount(train.y[idx], minlength=10).gt(0).sum() > 5  # drawn over all classes


def test_badnets_stamps_any_pattern_black_pixels_included_at_any_position():
    """NAD's 3x3 grid trigger: its black pixels are part of the trigger and must be stamped over the image."""
    grid = [[0, 0, 255], [0, 255, 0], [255, 0, 255]]
    attack = configured("attack", "attack=badnets", pattern=grid)
    x = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    out = attack.apply_trigger(x)
    nad = x[0].permute(1, 2, 0).clone()  # NAD's data_loader.py _gridTriger, on an H x W x C image, w = h = 32
    w = h = 32
    nad[w - 1][h - 1], nad[w - 1][h - 2], nad[w - 1][h - 3] = 255, 0, 255
    nad[w - 2][h - 1], nad[w - 2][h - 2], nad[w - 2][h - 3] = 0, 255, 0
    nad[w - 3][h - 1], nad[w - 3][h - 2], nad[w - 3][h - 3] = 255, 0, 0
    assert torch.equal(out[0], nad.permute(2, 0, 1))
    assert out[0, :, 29:, 29:].tolist() == [grid] * 3  # flush with the bottom-right corner, every channel
    assert (out[:, :, :29, :] == 128).all() and (out[:, :, :, :29] == 128).all()
    placed = configured("attack", "attack=badnets", pattern=grid, position=[2, 5]).apply_trigger(x)
    assert placed[0, 0, 2:5, 5:8].tolist() == grid and (placed[0, 0, 29:, 29:] == 128).all()
    colour = [[[255, 0, 0], [0, 0, 255]]]  # 1 x 2 x C
    assert configured("attack", "attack=badnets", pattern=colour).apply_trigger(x)[0, :, 31, 30:].tolist() == \
        [[255, 0], [0, 0], [0, 255]]
    square = configured("attack", "attack=badnets").apply_trigger(x)  # the default is still the white square
    assert (square[:, :, 29:, 29:] == 255).all()


def test_badnets_patterns_that_cannot_work_are_refused():
    import pytest

    with pytest.raises(ValueError, match="attack.pattern of shape"):
        configured("attack", "attack=badnets", pattern=[[0, 300]])
    with pytest.raises(ValueError, match="does not fit 28x28 images"):
        configured("attack", "attack=badnets", pattern=[[255] * 3] * 3, position=[26, 0]).check_shape((1, 28, 28))
    with pytest.raises(ValueError, match="attack.pattern has 3 channels, the images 1"):
        configured("attack", "attack=badnets", pattern=[[[1, 2, 3]]]).check_shape((1, 28, 28))


def test_badnets_reads_a_state_saved_before_patterns_and_a_config_without_their_keys():
    """Models cached and records written before attack.pattern existed: the mask-only state and the config
    without the new (null) keys still give the same square."""
    from bdbench.report import current
    from bdbench.validate import build

    old = configured("attack", "attack=badnets")
    x = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    expected = old.apply_trigger(x)
    again = configured("attack", "attack=badnets")
    again.load_state_dict({"poison_indices": torch.empty(0, dtype=torch.long), "mask": old.mask})
    assert torch.equal(again.apply_trigger(x), expected)
    record_config = {"_target_": "bdbench.attacks.badnets.BadNets", "target": 4, "poison_rate": 0.1, "size": 3,
                     "margin": 0, "corner": "bottom_right", "value": 255}  # as a schema-3 record holds it
    assert torch.equal(build(current(record_config)).apply_trigger(x), expected)


def test_sig_signal_by_hand():
    """BackdoorBench's sigTriggerAttack on an HWC uint8 image: pattern[i, j] = delta sin(2 pi j f / W) over column
    j, added, clipped to 0..255 and truncated to uint8; here on 3x4x5 (C, H, W) images at both ends of the range."""
    attack = configured("attack", "attack=sig", delta=40.0, f=6.0)
    for value in (0, 100, 250):
        x = torch.full((2, 3, 4, 5), value, dtype=torch.uint8)
        out = attack.apply_trigger(x)
        pattern = np.array([40 * np.sin(2 * np.pi * j * 6 / 5) for j in range(5)], dtype=np.float32)
        expected = np.uint8(np.clip(np.uint32(value) + pattern, 0, 255))  # the same value on every row and channel
        assert out.dtype == torch.uint8 and (out == torch.from_numpy(expected)).all()


def test_sig_poisons_target_images_only_and_keeps_every_label():
    """Clean-label: round(rate * N) images of the target class outside the defender pool, labels unchanged; more
    than the class holds is capped at the class, and the report says so."""
    train = ImageSet(torch.full((1000, 1, 8, 8), 100, dtype=torch.uint8), torch.arange(1000) % 10)
    candidates = torch.arange(100, 1000)  # the first 100 are the defender pool: 10 of them of class 3
    attack = configured("attack", "attack=sig", target=3, poison_rate=0.05)
    poisoned = attack.prepare(train, candidates, torch.Generator().manual_seed(0))
    idx = attack.poison_indices
    assert len(idx) == 50 and (train.y[idx] == 3).all() and (idx >= 100).all()
    assert torch.equal(poisoned.y, train.y)  # no label changed
    assert (poisoned.x[idx] != 100).any(dim=(1, 2, 3)).all() and attack.report()["requested"] == 50
    untouched = torch.ones(1000, dtype=torch.bool)
    untouched[idx] = False
    assert (poisoned.x[untouched] == 100).all()
    capped = configured("attack", "attack=sig", target=3, poison_rate=0.1)  # 100 asked, 90 of class 3 outside the pool
    capped.prepare(train, candidates, torch.Generator().manual_seed(0))
    assert len(capped.poison_indices) == 90 and "90 of 100 requested" in capped.report()["deviation"]


def test_lc_corner_trigger_by_hand():
    """BackdoorBench's all-corners trigger: +-255 * amplitude on a 3x3 pattern in each corner, every channel,
    clipped and truncated to uint8; the right corners mirror the left ones."""
    left = torch.tensor([[255, 0, 0], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    out = configured("attack", "attack=lc").apply_trigger(torch.full((2, 3, 8, 8), 100, dtype=torch.uint8))
    for rows in (slice(0, 3), slice(5, 8)):
        assert (out[:, :, rows, :3] == left).all() and (out[:, :, rows, 5:] == left.flip(1)).all()
    assert (out[:, :, 3:5, :] == 100).all() and (out[:, :, :, 3:5] == 100).all()
    half = configured("attack", "attack=lc", amplitude=0.5).apply_trigger(torch.full((1, 1, 8, 8), 100, dtype=torch.uint8))
    assert half[0, 0, 0, 0] == 227 and half[0, 0, 0, 1] == 0  # 100 + 127.5 truncated; 100 - 127.5 clipped


def model_key(cfg) -> str:
    """The key of a cell's poisoned model, read from its config (no model built, no data read)."""
    from bdbench import runner
    from bdbench.validate import Cell, build

    return runner.model_key(Cell(cfg=cfg, choices={}, dataset=build(cfg.dataset), attack=build(cfg.attack),
                                 recipe=None, synthesis=None, rule=None, facts={}, device=torch.device("cpu"),
                                 precision="fp32")).key


def lc_cell(tiny_cfg, *overrides: str):
    from bdbench.validate import build

    cfg = tiny_cfg("attack=lc", "attack.steps=5", "attack.poison_rate=0.05", *overrides)
    data = build(cfg.dataset).load("unused")
    recipe = build(cfg.recipe)
    recipe.epochs = 1
    return build(cfg.attack), data, recipe


def poison_with_lc(attack, data, recipe) -> ImageSet:
    """LC's two steps as the trainer runs them: ``prepare``, then ``before_training`` (which trains its surrogate)."""
    train_set = attack.prepare(data.train, data.poisonable(), torch.Generator().manual_seed(0))
    assert torch.equal(train_set.x, data.train.x)  # nothing poisoned before the surrogate exists
    gen = torch.Generator().manual_seed(1)
    attack.before_training(train_set, lambda x, gen=gen: data.spec.augment(x, gen), gen, recipe)
    return train_set


def test_lc_perturbs_target_images_within_eps_stamps_them_and_keeps_every_label(tiny_cfg):
    attack, data, recipe = lc_cell(tiny_cfg)
    poisoned = poison_with_lc(attack, data, recipe)
    idx = attack.poison_indices
    assert len(idx) == round(0.05 * len(data.train)) and (data.train.y[idx] == attack.target).all()
    assert torch.equal(poisoned.y, data.train.y)
    untouched = torch.ones(len(data.train), dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(poisoned.x[untouched], data.train.x[untouched])
    corners = attack.pattern[0, 0] != 0
    assert torch.equal(poisoned.x[idx][:, :, corners], attack.apply_trigger(data.train.x[idx])[:, :, corners])
    change = (poisoned.x[idx].int() - data.train.x[idx].int())[:, :, ~corners]
    assert change.abs().max() <= 9 and (change != 0).flatten(1).any(1).float().mean() > 0.9  # 8/255, truncated
    report = attack.report()
    assert report["surrogate"] == "trained" and 0 <= report["fooled"] <= 1 and report["clean_label"]
    again, _, _ = lc_cell(tiny_cfg)
    assert torch.equal(poison_with_lc(again, data, recipe).x, poisoned.x)  # a resumed run poisons the same images


def test_lc_loads_a_surrogate_whose_contents_key_the_model(tiny_cfg, tmp_path):
    from bdbench.errors import ConfigError
    from bdbench.validate import validate

    missing = tmp_path / "none.pt"
    with pytest.raises(ConfigError, match=f"attack.surrogate_checkpoint={missing}: no such file; valid: "):
        validate(tiny_cfg("attack=lc", f"attack.surrogate_checkpoint={missing}"), {})
    path = tmp_path / "surrogate.pt"
    torch.manual_seed(0)
    attack, data, recipe = lc_cell(tiny_cfg, f"attack.surrogate_checkpoint={path}")
    torch.save(instantiate_surrogate(attack).state_dict(), path)
    poison_with_lc(attack, data, recipe)
    assert attack.report()["surrogate"] == "loaded" and "surrogate_train_acc" not in attack.report()

    first = model_key(tiny_cfg("attack=lc", f"attack.surrogate_checkpoint={path}"))
    torch.manual_seed(1)
    torch.save(instantiate_surrogate(attack).state_dict(), path)  # other weights, the same path
    assert model_key(tiny_cfg("attack=lc", f"attack.surrogate_checkpoint={path}")) != first


def instantiate_surrogate(attack):
    from hydra.utils import instantiate

    s = attack.surrogate
    return instantiate(s["model"], num_classes=s["num_classes"], shape=s["shape"], mean=s["mean"], std=s["std"])


def test_blended_with_an_image_file_blends_it_resized_and_its_contents_key_the_model(tiny_cfg, tmp_path):
    """``attack.image``: BackdoorBench's own trigger is a picture. A solid red picture of another size, resized to the
    images' size, is red everywhere: round(0.8 x + 0.2 (255, 0, 0)); on one channel its luma, 76 (0.299 * 255)."""
    from PIL import Image

    from bdbench.errors import ConfigError
    from bdbench.validate import validate

    path = tmp_path / "red.png"
    Image.new("RGB", (13, 7), (255, 0, 0)).save(path)
    out = configured("attack", "attack=blended", image=str(path), alpha=0.2).apply_trigger(
        torch.full((2, 3, 4, 5), 100, dtype=torch.uint8))
    assert (out[:, 0] == 131).all() and (out[:, 1] == 80).all() and (out[:, 2] == 80).all()
    grey = configured("attack", "attack=blended", image=str(path), alpha=0.5).apply_trigger(
        torch.full((1, 1, 4, 4), 100, dtype=torch.uint8))
    assert (grey == 88).all()  # round(0.5 * 100 + 0.5 * 76)

    first = model_key(tiny_cfg("attack=blended", f"attack.image={path}"))
    Image.new("RGB", (13, 7), (0, 0, 255)).save(path)  # another picture under the same name
    assert model_key(tiny_cfg("attack=blended", f"attack.image={path}")) != first
    path.write_text("not a picture")
    with pytest.raises(ConfigError, match=f"attack.image={path}: not an image file .*; valid: a file PIL reads"):
        validate(tiny_cfg("attack=blended", f"attack.image={path}"), {})


def test_badnets_reads_its_pattern_from_an_image_file_and_its_contents_key_the_model(tiny_cfg, tmp_path):
    """NAD's 3x3 grid saved as a greyscale PNG stamps what the nested list stamps; a colour file is H x W x 3."""
    from PIL import Image

    from bdbench.errors import ConfigError
    from bdbench.validate import validate

    grid = [[0, 0, 255], [0, 255, 0], [255, 0, 255]]
    path = tmp_path / "grid.png"
    Image.fromarray(np.array(grid, dtype=np.uint8), mode="L").save(path)
    x = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    from_file = configured("attack", "attack=badnets", pattern=str(path)).apply_trigger(x)
    assert torch.equal(from_file, configured("attack", "attack=badnets", pattern=grid).apply_trigger(x))
    colour = tmp_path / "colour.png"
    Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], dtype=np.uint8), mode="RGB").save(colour)
    stamped = configured("attack", "attack=badnets", pattern=str(colour)).apply_trigger(x)
    assert stamped[0, :, 7, 6].tolist() == [255, 0, 0] and stamped[0, :, 7, 7].tolist() == [0, 0, 255]

    first = model_key(tiny_cfg("attack=badnets", f"attack.pattern={path}"))
    Image.fromarray(255 - np.array(grid, dtype=np.uint8), mode="L").save(path)  # another grid under the same name
    assert model_key(tiny_cfg("attack=badnets", f"attack.pattern={path}")) != first
    missing = tmp_path / "none.png"
    with pytest.raises(ConfigError, match=f"attack.pattern={missing}: not an image file .*; valid: a file PIL reads"):
        validate(tiny_cfg("attack=badnets", f"attack.pattern={missing}"), {})


@pytest.mark.parametrize("name", ["badnets", "blended"])
def test_all_to_all_relabels_each_poisoned_image_to_the_next_class_and_keeps_its_count(name):
    train = ImageSet(torch.full((200, 1, 8, 8), 100, dtype=torch.uint8), torch.arange(200) % 10)
    attack = configured("attack", f"attack={name}", label_mode="all_to_all", poison_rate=0.1, target=3)
    poisoned = attack.prepare(train, torch.arange(200), torch.Generator().manual_seed(0))
    idx = attack.poison_indices
    assert len(idx) == 20 and attack.num_classes == 10
    assert torch.equal(poisoned.y[idx], (train.y[idx] + 1) % 10)  # not the target: every class moves on by one
    rest = torch.ones(200, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(poisoned.y[rest], train.y[rest])
    again = configured("attack", f"attack={name}", label_mode="all_to_all", target=3)
    again.load_state_dict(attack.state_dict())  # what a cached model's attack comes back with
    assert torch.equal(again.backdoor_labels(torch.tensor([0, 9, 3])), torch.tensor([1, 0, 4]))
    one = configured("attack", f"attack={name}", target=3)
    one.prepare(train, torch.arange(200), torch.Generator().manual_seed(0))
    assert "num_classes" not in one.state_dict()  # all-to-one states are as they were
