"""The trigger gallery draws every attack's trigger from its cached artifacts."""

from __future__ import annotations

from PIL import Image

from bdbench.cli import gallery_plan
from bdbench.gallery import gallery, pick_images
from bdbench.validate import build, validate


def test_gallery_png_has_a_row_pair_per_attack(tiny_cfg):
    names = ("badnets", "blended", "wanet", "input_aware")

    def cells() -> dict:  # a cell runs once: the plan and the gallery each get their own
        made = {}
        for name in names:
            cfg = tiny_cfg(f"attack={name}", "recipe.epochs=1")
            if name == "input_aware":
                cfg.attack.mask_epochs, cfg.attack.mask_steps_per_epoch = 1, 2
            made[name] = validate(cfg, cfg.hydra.runtime.choices)
        return made

    plan = gallery_plan(cells())  # said before anything trains
    assert all("trains first: 1 epochs, time unknown" in line for line in plan), plan
    path = gallery(cells())
    assert path.name == "synthetic.png" and path.is_file()
    assert all(" cached (" in line for line in gallery_plan(cells()))  # the keys it trained under
    width, height = Image.open(path).size
    assert height > width  # 1 clean + 2 rows per attack = 9 rows of 6 images


def test_gallery_uses_one_image_per_class(tiny_cfg):
    data = build(tiny_cfg().dataset).load("unused")
    images = pick_images(data, 6)
    assert images.shape == (6, 1, 16, 16)


def test_gallery_leaves_out_an_attack_that_needs_the_users_files(tmp_path, monkeypatch, capsys):
    """input_aware_file has no trigger without its files (attack.checkpoint and attack.generators are ???): the gallery
    says so and draws the others; it composed every attack and died on the first mandatory value before."""
    import bdbench.gallery
    from bdbench.cli import gallery_command

    drawn = {}
    monkeypatch.setattr(bdbench.gallery, "gallery", lambda cells: drawn.update(cells) or tmp_path / "g.png")
    gallery_command(["dataset=synthetic", f"paths.cache={tmp_path / 'cache'}", f"paths.output={tmp_path / 'out'}",
                     f"paths.records={tmp_path / 'records'}"])
    said = capsys.readouterr().out
    assert "left out: input_aware_file (needs attack.checkpoint, attack.generators)" in said
    assert "input_aware_file" not in drawn and {"badnets", "input_aware", "wanet", "sig", "lc"} <= set(drawn)
