"""ACC, ASR, RA and DER against hand-computed cases (docs/attack_methods.md §7)."""

import pytest
import torch
from torch import nn

from bdbench.attacks.base import Attack, StaticPoisonAttack
from bdbench.data import ImageSet
from bdbench.metrics import backdoor_test_set, der, evaluate


class LookupModel(nn.Module):
    """Predicts label ``v`` for any image whose first pixel is v/255 (a hand-made classifier)."""

    def forward(self, x):
        value = (x[:, 0, 0, 0] * 255).round().long()
        return nn.functional.one_hot(value.clamp(0, 9), 10).float()


class StampAttack(Attack):
    """Trigger: first pixel := 0 (so the lookup model predicts class 0, the target)."""

    target = 0

    def apply_trigger(self, x):
        x = x.clone()
        x[:, 0, 0, 0] = 0
        return x


def make_test_set(first_pixels, labels):
    x = torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor(first_pixels, dtype=torch.uint8)
    return ImageSet(x, torch.tensor(labels))


def test_backdoor_test_set_keeps_only_non_target_images():
    test = ImageSet(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 0, 1, 2, 3, 0, 4, 5, 6, 7]))
    bd = backdoor_test_set(test, target=0)
    assert len(bd) == 7
    assert (bd.y != 0).all()


def test_backdoor_test_set_size_on_a_balanced_set():
    """The BackdoorBox #90 case: 10,000 balanced images, 10 classes -> 9,000 non-target images."""
    test = ImageSet(torch.zeros(10_000, 1, 1, 1, dtype=torch.uint8), torch.arange(10_000) % 10)
    assert len(backdoor_test_set(test, target=3)) == 9_000


def test_acc_asr_ra_by_hand():
    # predictions = first pixel; labels chosen so that 3 of 5 are right
    test = make_test_set([0, 1, 2, 9, 9], [0, 1, 2, 3, 4])
    attack = StampAttack()
    result = evaluate(LookupModel(), test, attack)
    assert result["acc"] == pytest.approx(3 / 5)
    # ASR set: labels 1,2,3,4 (4 images, target-class image excluded); the trigger makes all predict 0
    assert result["asr"] == pytest.approx(1.0)
    assert result["ra"] == pytest.approx(0.0)


def test_asr_denominator_excludes_target_class():
    """A trigger that fails on half the non-target images: ASR = 2/4, not 3/5."""

    class HalfAttack(StampAttack):
        def apply_trigger(self, x):
            x = x.clone()
            x[:2, 0, 0, 0] = 0  # only the first two images of the batch get the trigger
            return x

    test = make_test_set([1, 2, 3, 4, 0], [1, 2, 3, 4, 0])
    result = evaluate(LookupModel(), test, HalfAttack())
    assert result["asr"] == pytest.approx(2 / 4)
    assert result["ra"] == pytest.approx(2 / 4)  # the two untriggered ones keep their true label


class ShiftAttack(StaticPoisonAttack):
    """All-to-all on the lookup model: the trigger adds 1 to the first pixel, mod 10."""

    label_mode, num_classes = "all_to_all", 10

    def __init__(self) -> None:
        super().__init__(target=0, poison_rate=0.1)

    def build(self, shape):
        pass

    def apply_trigger(self, x):
        x = x.clone()
        x[:, 0, 0, 0] = (x[:, 0, 0, 0].long() + 1) % 10
        return x


def test_all_to_all_asr_by_hand():
    """BackdoorBench's all2all: every test image counts (the target class too), each wanted as (y + 1) mod 10. The
    fourth image's first pixel is wrong (7 for label 3), so its triggered prediction is 8, not 4: ASR 4/5."""
    test = make_test_set([0, 1, 9, 7, 4], [0, 1, 9, 3, 4])
    assert len(backdoor_test_set(test, ShiftAttack().backdoor_labels(test.y))) == 5
    result = evaluate(LookupModel(), test, ShiftAttack())
    assert result["acc"] == pytest.approx(4 / 5)
    assert result["asr"] == pytest.approx(4 / 5)  # 0 -> 1, 1 -> 2, 9 -> 0, 4 -> 5 right; 3 -> 8, not 4
    assert result["ra"] == pytest.approx(0.0)


def test_no_target_gives_null_asr():
    class Clean:
        target = None

    result = evaluate(LookupModel(), make_test_set([1, 2], [1, 2]), Clean())
    assert result == {"acc": 1.0, "asr": None, "ra": None, "top_class_share": 0.5, "collapsed": False}


@pytest.mark.parametrize("first_pixels, labels, share, expected", [
    (list(range(10)), list(range(10)), 0.1, False),                     # healthy: every class, all right
    ([0] * 10, list(range(10)), 1.0, True),                             # one class: ACC 10 % = chance
    ([0] * 9 + [9], list(range(10)), 0.9, True),                        # one class takes 90 %
    ([0] * 8 + [8, 9], [0] * 8 + [8, 9], 0.8, False),                   # 80 % of one class, all right
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 0] * 2, [1, 1] + list(range(2, 10)) + [0] * 10, 0.1, True),  # ACC 10 %: spread, but chance
])
def test_collapsed_by_hand(first_pixels, labels, share, expected):
    result = evaluate(LookupModel(), make_test_set(first_pixels, labels), StampAttack())
    assert result["top_class_share"] == pytest.approx(share) and result["collapsed"] is expected


@pytest.mark.parametrize(
    "before, after, expected",
    [
        ({"acc": 0.90, "asr": 1.00}, {"acc": 0.90, "asr": 1.00}, 0.5),     # no change
        ({"acc": 0.90, "asr": 1.00}, {"acc": 0.90, "asr": 0.00}, 1.0),     # ASR removed for free
        ({"acc": 0.90, "asr": 1.00}, {"acc": 0.80, "asr": 0.20}, 0.85),    # (0.8 - 0.1 + 1) / 2
        ({"acc": 0.90, "asr": 0.50}, {"acc": 0.95, "asr": 0.70}, 0.5),     # gains and rises clamp at 0
        ({"acc": 0.9132, "asr": 0.9503}, {"acc": 0.8996, "asr": 0.0148}, 0.9610),  # BackdoorBench FT row
    ],
)
def test_der_subtracting_formula(before, after, expected):
    assert der(before, after) == pytest.approx(expected, abs=1e-4)


def test_der_undefined_without_asr():
    assert der({"acc": 0.9, "asr": None}, {"acc": 0.9, "asr": None}) is None


class CountingStamp(StampAttack):
    def __init__(self):
        self.calls = 0

    def apply_trigger(self, x):
        self.calls += 1
        return super().apply_trigger(x)


def test_a_models_triggered_test_images_are_computed_once_and_give_the_fresh_metrics():
    """Input-aware's trigger (two generator passes) was 13.5 s of a Fashion-MNIST cell's 14.6 s of evaluation,
    repeated in each of a model's 36 cells; the runner now keeps the triggered images per poisoned model."""
    from bdbench.runner import RememberedTrigger

    test = make_test_set([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 0])
    attack = CountingStamp()
    fresh = evaluate(LookupModel(), test, attack, batch_size=4)
    assert attack.calls == 2  # 5 non-target images in batches of 4
    first = evaluate(LookupModel(), test, RememberedTrigger(attack, "model-a"), batch_size=4)
    again = evaluate(LookupModel(), test, RememberedTrigger(attack, "model-a"), batch_size=4)
    assert first == again == fresh and attack.calls == 4  # the second cell triggers nothing
    changed = make_test_set([1, 2, 3, 4, 7, 6], [1, 2, 3, 4, 5, 0])
    evaluate(LookupModel(), changed, RememberedTrigger(attack, "model-a"), batch_size=4)
    assert attack.calls == 5  # only the batch whose pixels differ is triggered again
    evaluate(LookupModel(), test, RememberedTrigger(attack, "model-b"), batch_size=4)
    assert attack.calls == 7  # another poisoned model: another trigger
