"""LONDON distiller: gradient reaches student and connectors, never the teacher; pairing errors."""

import copy

import pytest
import timm
import torch

from lcdistill import methods, recipe as recipes, tasks
from lcdistill.errors import UserError
from lcdistill.tasks import Batch

CFG = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def make(method="london", teacher_name="resnet18", **sets):
    sets.setdefault("london.warmup_epochs", 0)  # full weight at once: no trainer sets progress here
    layers = [{"student": {"name": "mobilenetv2_050"}, "method": method}] + [recipes.parse_override(f"{k}={v}") for k, v in sets.items()]
    recipe = recipes.build(layers)
    torch.manual_seed(0)
    student = timm.create_model("mobilenetv2_050", num_classes=10)
    teacher = timm.create_model(teacher_name, num_classes=10)
    return methods.build(recipe, tasks.get("classification"), student, teacher, CFG, CFG)


def test_lipschitz_term_trains_student_and_connectors_not_teacher():
    distiller = make(**{"loss.ce": 0, "kd.weight": 0})  # only the Lipschitz term
    teacher_before = copy.deepcopy(distiller.teacher.state_dict())
    distiller.train()
    images, targets = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    _, losses = distiller(Batch(images, targets, torch.zeros(len(images))))
    assert set(losses) == {"ce", "lip"} and losses["lip"] > 0
    sum(losses.values()).backward()
    student_grads = [p.grad for p in distiller.student.parameters() if p.grad is not None]
    assert student_grads and sum(g.abs().sum() for g in student_grads) > 0
    # every connector receives gradient: each is part of at least one transmitting matrix
    for conn in distiller.term("london").connectors:
        assert conn[0].weight.grad is not None and conn[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert not distiller.teacher.training  # teacher BN statistics must not drift
    for k, v in distiller.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


def test_alpha_scales_the_term_and_zero_alpha_removes_it():
    images, targets = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    one = make(**{"london.alpha": 1.0}).train()(Batch(images, targets, torch.zeros(len(images))))[1]["lip"]
    three = make(**{"london.alpha": 3.0}).train()(Batch(images, targets, torch.zeros(len(images))))[1]["lip"]
    torch.testing.assert_close(three, 3 * one)
    idle = make(**{"london.alpha": 0}).train()
    assert "lip" not in idle(Batch(images, targets, torch.zeros(len(images))))[1]
    # kept for measuring the gap, frozen so DDP sees no parameter left without gradient
    connectors = idle.term("london").connectors
    assert connectors is not None and not any(p.requires_grad for p in connectors.parameters())


def test_warmup_ramps_the_term_linearly_with_training_progress():
    images, targets = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    full = make().train()(Batch(images, targets, torch.zeros(len(images))))[1]["lip"]
    ramped = make(**{"london.warmup_epochs": 2}).train()
    for progress, share in ((0.0, 0.0), (0.5, 0.25), (1.0, 0.5), (2.0, 1.0), (7.5, 1.0)):
        ramped.progress = progress  # what the trainer sets before each step
        torch.testing.assert_close(ramped(Batch(images, targets, torch.zeros(len(images))))[1]["lip"], share * full)


def test_default_pairs_are_by_stride_deeper_weighted_more():
    london = make().term("london")
    assert [s.stride for s, _ in london.pairs] == [4, 8, 16, 32]
    assert [s.stride for s, t in london.pairs] == [t.stride for s, t in london.pairs]
    assert london.pair_weights.tolist() == [0.125, 0.25, 0.5]  # the authors': deepest 1/2


def test_a_one_position_matrix_is_left_out_and_the_printed_pairs_say_so():
    """At 32 px the stride-32 maps are 1x1: that TM is rank 1 (its sigma a product of feature norms)
    and is left out; at 64 px (2x2) every TM is used. The weights follow the matrices used."""
    images, targets = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    small = make(**{"data.input_size": 32, "loss.ce": 0, "kd.weight": 0})
    london = small.term("london")
    assert london.matrices == [0, 1] and london.pair_weights.tolist() == [0.25, 0.5]
    lines = small.describe()
    assert lines[-1] == "transmitting matrix stride 16 -> 32 (1x1 map at 32 px): left out, 1 position(s) < london.min_positions 4"
    assert lines[-2] == "transmitting matrix stride 8 -> 16 (2x2 map at 32 px): weight 0.5"
    _, losses = small.train()(Batch(images, targets, torch.zeros(len(images))))
    assert london.stats["lip_gap"].shape == (2,)
    # the stride-32 pair feeds only the left-out matrix: not tapped and no connector (whose parameters
    # would get no gradient, which DDP refuses); every connector built gets gradient
    assert len(london.connectors) == 3 and london.student_taps() == [s.name for s, _ in london.pairs[:3]]
    losses["lip"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in london.connectors.parameters())
    with_features = make(**{"data.input_size": 32, "london.feature_weight": 1.0}).term("london")
    assert len(with_features.connectors) == 4  # the feature loss reads every pair

    assert make(**{"data.input_size": 64}).term("london").matrices == [0, 1, 2]
    assert make(**{"data.input_size": 32, "london.min_positions": 1}).term("london").matrices == [0, 1, 2]
    with pytest.raises(UserError, match="min_positions"):
        make(**{"data.input_size": 32, "london.min_positions": 100})


def test_a_checkpoint_with_other_connectors_is_one_user_error():
    """A run saved when every matrix was kept (4 connectors) does not fit a term that leaves one out (3)."""
    saved = make(**{"data.input_size": 64}).method_state()
    now = make(**{"data.input_size": 32})
    with pytest.raises(UserError, match="london state does not fit"):
        now.load_method_state(saved)
    now.load_method_state(now.method_state())  # its own state loads


def test_pairs_set_in_recipe_are_used():
    london = make(**{"london.pairs": "[[blocks.2, layer2], [blocks.4, layer3], [blocks.6, layer4]]"}).term("london")
    assert [(s.name, t.name) for s, t in london.pairs] == [("blocks.2", "layer2"), ("blocks.4", "layer3"), ("blocks.6", "layer4")]
    # out of depth order at 32 px, the middle matrix sits on a 1x1 map and the last does not: one line, not
    # a connector without gradient
    with pytest.raises(UserError, match="not in depth order"):
        make(**{"data.input_size": 32, "london.pairs": "[[blocks.2, layer2], [blocks.6, layer4], [blocks.4, layer3]]"})


def test_vit_teacher_is_a_clear_error_for_london_but_works_for_kd():
    with pytest.raises(UserError, match="kd"):
        make(teacher_name="vit_tiny_patch16_224")
    kd = make(method="kd", teacher_name="vit_tiny_patch16_224")
    _, losses = kd.train()(Batch(torch.rand(2, 3, 224, 224), torch.tensor([1, 2]), torch.zeros(2)))
    assert set(losses) == {"ce", "kd"}


def test_raw_student_side_needs_no_connectors_and_still_trains_the_student():
    distiller = make(**{"loss.ce": 0, "kd.weight": 0, "london.student_side": "raw"})
    assert distiller.term("london").connectors is None
    _, losses = distiller.train()(Batch(torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)), torch.zeros(8)))
    losses["lip"].backward()
    assert sum(p.grad.abs().sum() for p in distiller.student.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in distiller.teacher.parameters())


def test_plain_london_reads_its_own_stage_outputs_and_kd_london_is_london():
    """`london` (= ce + kd + london) keeps its own taps and connectors; only with ofd in the method
    does the Lipschitz term read ofd's pre-ReLU maps instead."""
    images, targets = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    plain = make()
    london = plain.term("london")
    assert [t.name for t in plain.terms] == ["kd", "london"] and not london.shared
    assert london.student_taps() == ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]
    assert london.teacher_taps() == ["layer1", "layer2", "layer3", "layer4"]
    assert london.connectors is not None
    a = plain.train()(Batch(images, targets, torch.zeros(len(images))))[1]
    b = make("kd+london").train()(Batch(images, targets, torch.zeros(len(images))))[1]
    assert set(a) == {"ce", "kd", "lip"} and all(torch.equal(a[k], b[k]) for k in a)
    shared = make("ofd+london").term("london")
    assert shared.shared and shared.connectors is None and shared.student_taps() == []
