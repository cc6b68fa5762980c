"""Stage discovery, pairing and feature tapping (lcdistill.models: stages, probe, taps).

Every model is built with random weights (pretrained=False / weights=None),
num_classes=10; nothing is downloaded.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torchvision

from lcdistill.models import (
    FeatureTap,
    Stage,
    describe_pairs,
    find_stages,
    pair_stages,
    probe_modules,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Small models at 64-224 px: one intra-op thread is as fast, and immune to the
    # large slowdowns of oversubscribed CPUs (other jobs on a 2-core box).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _timm(name):
    def build():
        return timm.create_model(name, pretrained=False, num_classes=10)

    return build


def _tv(name, **kw):
    def build():
        return getattr(torchvision.models, name)(weights=None, num_classes=10, **kw)

    return build


_TIMM_NAMES = [
    "resnet18",
    "mobilenetv2_050",
    "mobilenetv3_small_050",
    "efficientnet_b0",
    "regnetx_002",
    "convnext_atto",
    "densenet121",
    "ghostnet_050",
]

FAMILIES = [pytest.param(_timm(n), id=f"timm-{n}") for n in _TIMM_NAMES] + [
    pytest.param(_tv("resnet18"), id="tv-resnet18"),
    pytest.param(_tv("mobilenet_v2", width_mult=0.5), id="tv-mobilenet_v2"),
    pytest.param(_tv("mobilenet_v3_small"), id="tv-mobilenet_v3_small"),
    pytest.param(_tv("efficientnet_b0"), id="tv-efficientnet_b0"),
    pytest.param(_tv("regnet_x_400mf"), id="tv-regnet_x_400mf"),
    pytest.param(_tv("convnext_tiny"), id="tv-convnext_tiny"),
    pytest.param(_tv("densenet121"), id="tv-densenet121"),
]

# Stage names per stride 4/8/16/32 that discovery must pick (stage *ends*, not the
# first conv of the next downsampling block).
EXPECTED_NAMES = {
    "timm-resnet18": ["layer1", "layer2", "layer3", "layer4"],
    "timm-convnext_atto": ["stages.0", "stages.1", "stages.2", "stages.3"],
    "tv-resnet18": ["layer1", "layer2", "layer3", "layer4"],
    "tv-mobilenet_v2": ["features.3", "features.6", "features.13", "features"],
    "tv-efficientnet_b0": ["features.2", "features.3", "features.5", "features"],
    "tv-regnet_x_400mf": [
        "trunk_output.block1",
        "trunk_output.block2",
        "trunk_output.block3",
        "trunk_output",
    ],
    "tv-convnext_tiny": ["features.1", "features.3", "features.5", "features"],
    "tv-densenet121": [
        "features.denseblock1",
        "features.denseblock2",
        "features.denseblock3",
        "features",
    ],
}


def _no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()
    )


@pytest.mark.parametrize("build", FAMILIES)
def test_find_stages_matches_real_feature_maps(build, request):
    model = build()
    model.train()
    model.get_submodule(next(n for n, _ in model.named_children())).eval()  # mixed modes
    modes = {n: m.training for n, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}

    stages = find_stages(model)

    # discovery changes nothing and leaves no hooks
    assert {n: m.training for n, m in model.named_modules()} == modes
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _no_hooks(model)

    strides = [s.stride for s in stages]
    assert strides == sorted(set(strides)), strides
    assert {4, 8, 16, 32} <= set(strides), stages
    modules = dict(model.named_modules())
    assert all(s.name in modules and s.name != "" for s in stages)

    expected = EXPECTED_NAMES.get(request.node.callspec.id)
    if expected is not None:
        by_stride = {s.stride: s.name for s in stages}
        assert [by_stride[k] for k in (4, 8, 16, 32)] == expected

    # the reported channels and strides are what the tapped modules really output
    model.eval()
    tap = FeatureTap(model, [s.name for s in stages])
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    for st, feat in zip(stages, tap.get([s.name for s in stages])):
        assert feat.dim() == 4, (st, feat.shape)
        assert feat.shape[0] == 2
        assert feat.shape[1] == st.channels, (st, feat.shape)
        assert feat.shape[2] == feat.shape[3] == 64 // st.stride, (st, feat.shape)
    tap.remove()
    assert _no_hooks(model)


def test_transition_modules_are_not_stage_ends():
    # torchvision DenseNet: transitionN.conv runs at stride s but inside the block
    # that pools to 2s; mobilenet_v2: features.4.conv.0 is the expansion conv of the
    # downsampling block.  Both are last at their stride in hook order.
    for model in (_tv("densenet121")(), _tv("mobilenet_v2", width_mult=0.5)()):
        names = [s.name for s in find_stages(model)]
        assert not any(".transition" in n or ".conv.0" in n for n in names), names


def test_fixed_size_and_unpadded_outputs():
    # AdaptiveAvgPool2d((7, 7)) gives 7x7 at 224 (looks like stride 32) but is not a
    # stride-32 map; unpadded convs shrink maps a little below probe/stride.
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2),  # unpadded: 111 at 224
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2),  # unpadded
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d((7, 7)),
        nn.Flatten(),
        nn.Linear(64 * 49, 10),
    )
    stages = find_stages(model)
    assert [(s.name, s.stride, s.channels) for s in stages] == [
        ("1", 2, 8),
        ("3", 4, 16),
        ("5", 8, 32),
        ("6", 16, 32),
        ("7", 32, 64),
    ]


def test_shared_module_reused_at_several_strides_is_skipped():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()  # reused at strides 2, 4, 8
            self.c1 = nn.Conv2d(3, 8, 3, 2, 1)
            self.c2 = nn.Conv2d(8, 8, 3, 2, 1)
            self.c3 = nn.Conv2d(8, 8, 3, 2, 1)

        def forward(self, x):
            return self.act(self.c3(self.act(self.c2(self.act(self.c1(x))))))

    assert [s.name for s in find_stages(Net())] == ["c1", "c2", "c3"]


def test_vit_has_no_stages_and_cannot_pair():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    vit_stages = find_stages(vit)
    assert vit_stages == []
    cnn_stages = find_stages(_timm("resnet18")())
    with pytest.raises(ValueError, match="no stride-separated stages in common") as exc:
        pair_stages(cnn_stages, vit_stages)
    assert "--method kd" in str(exc.value)
    # feature_info alone (every block at reduction 16) must also end in the error
    raw = [Stage(d["module"], d["num_chs"], d["reduction"]) for d in vit.feature_info]
    with pytest.raises(ValueError, match="no stride-separated stages in common"):
        pair_stages(raw, cnn_stages)
    with pytest.raises(ValueError, match="--method kd"):
        pair_stages(raw, raw)


@pytest.fixture(scope="module")
def timm_resnet():
    return _timm("resnet18")()


@pytest.fixture(scope="module")
def tv_mbv2():
    return _tv("mobilenet_v2", width_mult=0.5)()


def test_default_pairing_both_directions(timm_resnet, tv_mbv2):
    t_stages, s_stages = find_stages(timm_resnet), find_stages(tv_mbv2)

    pairs = pair_stages(s_stages, t_stages, min_stride=4)
    assert [(s.stride, t.stride) for s, t in pairs] == [(4, 4), (8, 8), (16, 16), (32, 32)]
    assert [t.name for _, t in pairs] == ["layer1", "layer2", "layer3", "layer4"]
    assert describe_pairs(pairs)[1] == (
        "stride 8: student features.6 (16 ch) <-> teacher layer2 (128 ch)"
    )

    reverse = pair_stages(t_stages, s_stages, min_stride=4)
    assert [(s.stride, t.stride) for s, t in reverse] == [(4, 4), (8, 8), (16, 16), (32, 32)]
    assert [s.name for s, _ in reverse] == ["layer1", "layer2", "layer3", "layer4"]

    assert [s.stride for s, _ in pair_stages(s_stages, t_stages, min_stride=8)] == [8, 16, 32]
    assert [s.stride for s, _ in pair_stages(s_stages, t_stages, min_stride=2)] == [2, 4, 8, 16, 32]
    with pytest.raises(ValueError, match="no stride-separated stages in common"):
        pair_stages(s_stages, t_stages, min_stride=32)


def test_explicit_pairs(timm_resnet, tv_mbv2):
    t_stages, s_stages = find_stages(timm_resnet), find_stages(tv_mbv2)
    pairs = pair_stages(
        s_stages, t_stages, pairs=[["features.13", "layer3"], ["features.3", "layer1"]]
    )
    assert [(s.name, t.name) for s, t in pairs] == [("features.13", "layer3"), ("features.3", "layer1")]
    assert [(s.stride, s.channels, t.stride, t.channels) for s, t in pairs] == [
        (16, 48, 16, 256),
        (4, 16, 4, 64),
    ]

    # with the models passed, any module path with a 4D output works (probed)
    pairs = pair_stages(
        s_stages,
        t_stages,
        pairs=[["features.6", "layer2.0"], ["features.10", "layer3.1.conv2"]],
        student=tv_mbv2,
        teacher=timm_resnet,
    )
    assert [(t.name, t.stride, t.channels) for _, t in pairs] == [
        ("layer2.0", 8, 128),
        ("layer3.1.conv2", 16, 256),
    ]
    assert (pairs[1][0].stride, pairs[1][0].channels) == (16, 32)
    assert describe_pairs(pairs)[0].startswith("stride 8: student features.6")

    # mixed strides are honoured and described
    mixed = pair_stages(s_stages, t_stages, pairs=[["features.3", "layer2"], ["features.6", "layer3"]])
    assert describe_pairs(mixed)[0] == "stride 4/8: student features.3 (16 ch) <-> teacher layer2 (128 ch)"

    # a single explicit pair is not enough for LONDON
    with pytest.raises(ValueError, match="no stride-separated stages in common"):
        pair_stages(s_stages, t_stages, pairs=[["features.3", "layer1"]])


def test_explicit_pairs_bad_names(timm_resnet, tv_mbv2):
    t_stages, s_stages = find_stages(timm_resnet), find_stages(tv_mbv2)
    with pytest.raises(ValueError) as exc:
        pair_stages(s_stages, t_stages, pairs=[["features.3", "layer1"], ["features.6", "layer9"]])
    msg = str(exc.value)
    assert "'layer9'" in msg and "teacher" in msg
    assert all(n in msg for n in ("layer1", "layer2", "layer3", "layer4"))

    with pytest.raises(ValueError) as exc:
        pair_stages(
            s_stages,
            t_stages,
            pairs=[["nope", "layer1"], ["features.6", "layer2"]],
            student=tv_mbv2,
            teacher=timm_resnet,
        )
    msg = str(exc.value)
    assert "'nope'" in msg and "student" in msg and "features.13" in msg

    # an existing module that is not a feature map (the classifier) is refused too
    with pytest.raises(ValueError, match="4D"):
        pair_stages(
            s_stages,
            t_stages,
            pairs=[["features.3", "fc"], ["features.6", "layer2"]],
            student=tv_mbv2,
            teacher=timm_resnet,
        )

    with pytest.raises(ValueError, match="student_module, teacher_module"):
        pair_stages(s_stages, t_stages, pairs=[["features.3"], ["features.6", "layer2"]])


def test_probe_modules(timm_resnet):
    st = probe_modules(timm_resnet, ["layer4", "layer1.0.bn1"])
    assert [(s.name, s.stride, s.channels) for s in st] == [("layer4", 32, 512), ("layer1.0.bn1", 4, 64)]
    with pytest.raises(ValueError, match="no module named"):
        probe_modules(timm_resnet, ["layer5"])
    assert _no_hooks(timm_resnet)


def test_feature_tap_keeps_grad_and_removes_hooks():
    model = _tv("resnet18")()
    model.train()
    tap = FeatureTap(model, ["layer2", "layer4"])
    x = torch.randn(2, 3, 64, 64)
    model(x)
    f2, f4 = tap.get(["layer2", "layer4"])
    assert f2.shape == (2, 128, 8, 8) and f4.shape == (2, 512, 2, 2)
    assert f2.requires_grad and f2.grad_fn is not None
    loss = f2.pow(2).mean()
    loss.backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert model.layer2[0].conv1.weight.grad.abs().sum() > 0
    assert model.layer3[0].conv1.weight.grad is None  # downstream of the tap

    # order follows the request
    assert [t.shape[1] for t in tap.get(["layer4", "layer2"])] == [512, 128]

    # cleared each step: nothing kept; asking before the next forward is an error
    tap.clear()
    assert tap.features == {}
    with pytest.raises(RuntimeError, match="did not run"):
        tap.get(["layer2"])
    with pytest.raises(KeyError):
        tap.get(["layer3"])

    tap.remove()
    assert _no_hooks(model)
    model(x)
    assert tap.features == {}

    with pytest.raises(ValueError, match="no such module"):
        FeatureTap(model, ["layer7"])


def test_feature_tap_tuple_output_and_unrun_module():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y, y.mean()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Pair()
            self.unused = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.block(x)[0].sum()

    net = Net()
    tap = FeatureTap(net, ["block", "unused"])
    net(torch.randn(1, 3, 8, 8))
    (feat,) = tap.get(["block"])
    assert feat.shape == (1, 4, 8, 8) and feat.requires_grad
    with pytest.raises(RuntimeError, match="'unused'"):
        tap.get(["block", "unused"])
    tap.remove()
    assert _no_hooks(net)


def test_compiled_model_names_are_unwrapped():
    model = _tv("resnet18")()
    compiled = torch.compile(model)  # not run: discovery probes the original module
    assert [s.name for s in find_stages(compiled)] == [s.name for s in find_stages(model)]
    tap = FeatureTap(compiled, ["layer3"])
    model(torch.randn(1, 3, 64, 64))
    assert tap.get(["layer3"])[0].shape == (1, 256, 4, 4)
    tap.remove()
    assert _no_hooks(model)


def test_bad_probe_size():
    with pytest.raises(ValueError, match="probe_size"):
        find_stages(nn.Conv2d(3, 3, 1), probe_size=8)
