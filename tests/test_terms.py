"""The method terms beside LONDON (kd dense, dkd, dist, ofd, cwd) and how terms compose.

Each loss is checked against its paper's formula written out plainly here (loops, probabilities,
no helper of the implementation), then the terms are built and stepped on tiny timm models, and
two compositions run end to end through the CLI on the digits.
"""

from __future__ import annotations

import copy
import csv
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from lcdistill import methods, recipe as recipes, tasks
from lcdistill.errors import UserError
from lcdistill.lipschitz import default_pair_weights, lipschitz_loss, stage_sigmas
from lcdistill.methods.base import Context, Step
from lcdistill.methods.cwd import CWD, cwd_loss
from lcdistill.methods.dist import dist_loss
from lcdistill.methods.dkd import dkd_loss, dkd_parts
from lcdistill.methods.kd import kd_loss
from lcdistill.methods.ofd import gaussian_margin, partial_l2
from lcdistill.tasks import Batch, LogitView

CFG = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- kd ------------------------------------------------------------------------------------------
def test_kd_two_dimensional_path_is_the_plain_batchmean_kl_bit_for_bit():
    s, t = torch.randn(6, 10, generator=gen(1)), torch.randn(6, 10, generator=gen(2))
    expected = F.kl_div(F.log_softmax(s / 4.0, dim=1), F.log_softmax(t / 4.0, dim=1), reduction="batchmean", log_target=True) * 4.0**2
    assert torch.equal(kd_loss(s, t, 4.0, 1), expected)


def test_kd_dense_is_per_pixel_over_labelled_pixels():
    n, c, h, w, T = 2, 4, 3, 5, 2.0
    s, t = torch.randn(n, c, h, w, generator=gen(3)), torch.randn(n, c, h, w, generator=gen(4))
    y = torch.randint(0, c, (n, h, w), generator=gen(5))
    y[0, 0, :3] = 255
    y[1, 2, 4] = 255
    total, count = 0.0, 0
    for i in range(n):
        for a in range(h):
            for b in range(w):
                if y[i, a, b] == 255:
                    continue
                p_t = torch.softmax(t[i, :, a, b] / T, 0)
                p_s = torch.softmax(s[i, :, a, b] / T, 0)
                total += float((p_t * (p_t.log() - p_s.log())).sum())
                count += 1
    ref = total / count * T**2
    valid = tasks.get("segmentation").logit_view(s, y).valid  # the task marks 255 (and only 255) unlabelled
    assert kd_loss(s, t, T, 1, valid) == pytest.approx(ref, rel=1e-5)
    # every pixel ignored: zero, with a gradient of zero
    s.requires_grad_(True)
    zero = kd_loss(s, t, T, 1, tasks.get("segmentation").logit_view(s, torch.full((n, h, w), 255)).valid)
    zero.backward()
    assert zero == 0 and torch.count_nonzero(s.grad) == 0


# ---- dkd -----------------------------------------------------------------------------------------
def dkd_reference(s, t, y, alpha, beta, T):
    """DKD's equations: b = [p_target, 1 - p_target]; q = p over the non-target classes renormalised."""
    tckd = nckd = 0.0
    for i in range(s.shape[0]):
        ps, pt = torch.softmax(s[i].double() / T, 0), torch.softmax(t[i].double() / T, 0)
        g = int(y[i])
        bs, bt = torch.stack([ps[g], 1 - ps[g]]), torch.stack([pt[g], 1 - pt[g]])
        tckd += float((bt * (bt / bs).log()).sum())
        others = [k for k in range(s.shape[1]) if k != g]
        qs, qt = ps[others] / (1 - ps[g]), pt[others] / (1 - pt[g])
        nckd += float((qt * (qt / qs).log()).sum())
    n = s.shape[0]
    return alpha * tckd / n * T**2 + beta * nckd / n * T**2


def test_dkd_matches_its_formula():
    s, t = torch.randn(6, 7, generator=gen(6)) * 3, torch.randn(6, 7, generator=gen(7)) * 3
    y = torch.randint(0, 7, (6,), generator=gen(8))
    for alpha, beta, T in ((1.0, 8.0, 4.0), (1.0, 0.0, 1.0), (0.0, 1.0, 2.0)):
        assert dkd_loss(s, t, y, alpha, beta, T) == pytest.approx(dkd_reference(s, t, y, alpha, beta, T), rel=1e-5)


def test_dkd_with_alpha_beta_one_is_kd():
    """With alpha = beta = 1 DKD is not KD (the paper's point), but TCKD + (1 - p_t) * NCKD is: check the split."""
    s, t = torch.randn(5, 6, generator=gen(9)), torch.randn(5, 6, generator=gen(10))
    y = torch.randint(0, 6, (5,), generator=gen(11))
    T = 3.0
    tckd, nckd = dkd_parts(s, t, y, T)
    p_t = torch.softmax(t / T, 1).gather(1, y[:, None]).squeeze(1)
    # per-sample NCKD weighted by (1 - p_t): recompute per row
    per_row = [dkd_parts(s[i:i + 1], t[i:i + 1], y[i:i + 1], T)[1] for i in range(5)]
    weighted = sum((1 - p_t[i]) * per_row[i] for i in range(5)) / 5
    assert float(tckd + weighted) == pytest.approx(float(kd_loss(s, t, T, 1)), rel=1e-5)


def test_dkd_stays_finite_with_two_classes_and_saturated_logits():
    for scale in (1.0, 60.0, 2000.0):
        s = (torch.randn(8, 2, generator=gen(12)) * scale).requires_grad_(True)
        t = torch.randn(8, 2, generator=gen(13)) * scale
        y = torch.randint(0, 2, (8,), generator=gen(14))
        tckd, nckd = dkd_parts(s, t, y, 1.0)
        assert nckd == 0  # one non-target class: its distribution is certain
        loss = dkd_loss(s, t, y, 1.0, 8.0, 1.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all(), scale
    # what mdistiller's masking does at that scale: log(softmax) of a saturated student is -inf
    s, t, y = torch.tensor([[60.0, -60.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    p_s = torch.softmax(s.double() / 1.0, 1).float()
    naive = (torch.softmax(t, 1) * (torch.softmax(t, 1).log() - p_s.log())).sum()
    assert not torch.isfinite(naive)
    assert torch.isfinite(dkd_loss(s, t, y, 1.0, 8.0, 1.0))


def test_dkd_dense_uses_labelled_pixels_only():
    s, t = torch.randn(2, 3, 2, 2, generator=gen(15)), torch.randn(2, 3, 2, 2, generator=gen(16))
    y = torch.tensor([[[0, 1], [255, 2]], [[2, 255], [1, 0]]])
    rows_s = s.permute(0, 2, 3, 1).reshape(-1, 3)
    rows_t = t.permute(0, 2, 3, 1).reshape(-1, 3)
    keep = y.reshape(-1) != 255
    ref = dkd_reference(rows_s[keep], rows_t[keep], y.reshape(-1)[keep], 1.0, 8.0, 4.0)
    view = tasks.get("segmentation").logit_view(s, y)
    assert dkd_loss(s, t, view.labels, 1.0, 8.0, 4.0, 1, view.valid) == pytest.approx(ref, rel=1e-5)


# ---- dist ----------------------------------------------------------------------------------------
def pearson(a, b):
    a, b = a.double(), b.double()
    da, db = a - a.mean(), b - b.mean()
    return float((da * db).sum() / (da.pow(2).sum().sqrt() * db.pow(2).sum().sqrt()))


def test_dist_matches_its_formula():
    n, c = 6, 5
    s, t = torch.randn(n, c, generator=gen(17)) * 2, torch.randn(n, c, generator=gen(18)) * 2
    for beta, gamma, tau in ((1.0, 1.0, 1.0), (2.0, 0.5, 4.0)):
        ys, yt = torch.softmax(s / tau, 1), torch.softmax(t / tau, 1)
        inter = 1 - sum(pearson(ys[i], yt[i]) for i in range(n)) / n
        intra = 1 - sum(pearson(ys[:, j], yt[:, j]) for j in range(c)) / c
        ref = tau**2 * (beta * inter + gamma * intra)
        assert dist_loss(s, t, beta, gamma, tau) == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert float(dist_loss(s, s, 1.0, 1.0, 1.0)) == pytest.approx(0.0, abs=1e-5)


# ---- cwd -----------------------------------------------------------------------------------------
def test_cwd_matches_its_formula():
    n, c, h, w, T = 2, 3, 4, 5, 4.0
    s, t = torch.randn(n, c, h, w, generator=gen(19)), torch.randn(n, c, h, w, generator=gen(20))
    total = 0.0
    for i in range(n):
        for k in range(c):
            p_t = torch.softmax(t[i, k].flatten().double() / T, 0)
            p_s = torch.softmax(s[i, k].flatten().double() / T, 0)
            total += float((p_t * (p_t / p_s).log()).sum())
    assert cwd_loss(s, t, T) == pytest.approx(total / (n * c) * T**2, rel=1e-5)


class FakeDense:
    name = "segmentation"
    class_dim = 1
    offers = frozenset({"scores", "softmax", "dense"})

    class export:  # noqa: N801 - what an ExportSpec looks like
        dynamic_axes = {0: "batch", 2: "height", 3: "width"}


def test_cwd_refuses_classification_and_steps_on_dense_predictions():
    with pytest.raises(UserError, match="dense"):
        make("cwd")
    settings = recipes.default_recipe()["cwd"]
    term = CWD(settings, Context(None, None, FakeDense()))
    s = torch.randn(2, 3, 8, 8, requires_grad=True)
    t = torch.randn(2, 3, 8, 8)
    loss = term(Step(LogitView(s), LogitView(t), 2, 0.0))["cwd"]
    loss.backward()
    assert float(loss.detach()) == pytest.approx(3.0 * float(cwd_loss(s.detach(), t, 4.0)))
    assert s.grad.abs().sum() > 0


# ---- ofd maths -----------------------------------------------------------------------------------
def test_ofd_margin_is_the_expected_negative_part_of_the_bn_gaussian():
    std = torch.tensor([1.0, 0.5, 2.0, 0.1, 1.0])
    mean = torch.tensor([0.0, 1.0, -1.0, 1.0, 5.0])
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    expected = []
    for s, m in zip(std.tolist(), mean.tolist()):
        p = phi(-m / s)
        # E[x | x < 0] for x ~ N(m, s^2) = m - s * pdf(m / s) / cdf(-m / s), or -3s when P(x < 0) is tiny
        expected.append(m - s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / p if p > 0.001 else -3 * s)
    torch.testing.assert_close(gaussian_margin(std, mean), torch.tensor(expected))
    assert (gaussian_margin(std, mean) <= 0).all()


def test_ofd_partial_l2_skips_where_the_student_is_below_a_negative_target():
    s = torch.tensor([[-2.0, -0.5, 0.5, 1.0, -1.0]]).view(1, 5, 1, 1)
    t = torch.tensor([[-3.0, -3.0, 2.0, -3.0, 0.5]]).view(1, 5, 1, 1)
    margin = torch.full((1, 5, 1, 1), -1.0)
    # targets max(t, -1) = [-1, -1, 2, -1, 0.5]; student above a negative target or a positive target counts
    counted = [(-2.0, -1.0, False), (-0.5, -1.0, True), (0.5, 2.0, True), (1.0, -1.0, True), (-1.0, 0.5, True)]
    ref = sum((a - b) ** 2 for a, b, used in counted if used)
    assert float(partial_l2(s, t, margin)) == pytest.approx(ref)


# ---- terms on tiny models ------------------------------------------------------------------------
def make(method, teacher_name="resnet18", **sets):
    sets.setdefault("london.warmup_epochs", 0)
    sets.setdefault("dkd.warmup_epochs", 0)
    layers = [{"student": {"name": "mobilenetv2_050"}, "method": method}] + [recipes.parse_override(f"{k}={v}") for k, v in sets.items()]
    recipe = recipes.build(layers)
    torch.manual_seed(0)
    student = timm.create_model("mobilenetv2_050", num_classes=10)
    teacher = timm.create_model(teacher_name, num_classes=10)
    with torch.no_grad():  # a trained teacher's BNs, not timm's zero-initialised last BN of each block
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen(40))
                m.bias.uniform_(-0.5, 0.5, generator=gen(41))
    return methods.build(recipe, tasks.get("classification"), student, teacher, CFG, CFG)


@pytest.mark.parametrize("method,losses", [
    ("dkd", {"ce", "dkd"}),
    ("dist", {"ce", "dist"}),
    ("ofd", {"ce", "ofd"}),
    ("dist+london", {"ce", "dist", "lip"}),
    ("ofd+london", {"ce", "ofd", "lip"}),
])
def test_terms_train_the_student_and_never_the_teacher(method, losses):
    distiller = make(method)
    teacher_before = copy.deepcopy(distiller.teacher.state_dict())
    distiller.train()
    images, targets = torch.rand(8, 3, 32, 32, generator=gen(21)), torch.randint(0, 10, (8,), generator=gen(22))
    _, out = distiller(Batch(images, targets, torch.zeros(len(images))))
    assert set(out) == losses
    for name in losses - {"ce"}:
        assert torch.isfinite(out[name]) and out[name] > 0, name
        distiller.zero_grad()
        out[name].backward(retain_graph=True)
        grads = [p.grad for p in distiller.student.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0, f"{name} does not reach the student"
    assert all(p.grad is None for p in distiller.teacher.parameters())
    for k, v in distiller.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


def test_ofd_reads_pre_relu_maps_and_the_bn_before_each():
    distiller = make("ofd")
    ofd = distiller.term("ofd")
    assert [t.name for _, t in ofd.pairs] == ["layer1", "layer2", "layer3", "layer4"]
    assert ofd.teacher_names == [f"layer{i}.1.act2:in" for i in range(1, 5)]  # input of the block's last ReLU
    assert ofd.margin_sources == [f"layer{i}.1.bn2" for i in range(1, 5)]  # OFD's get_bn_before_relu
    assert ofd.student_names == [s.name for s, _ in ofd.pairs]  # MobileNetV2 stage outputs are linear already
    bn = dict(distiller.teacher.named_modules())["layer2.1.bn2"]
    torch.testing.assert_close(ofd.margin1.flatten(), gaussian_margin(bn.weight, bn.bias))
    # the tapped teacher maps are pre-ReLU (signed); the stage outputs are not
    distiller.train()
    images, targets = torch.rand(4, 3, 32, 32, generator=gen(23)), torch.randint(0, 10, (4,), generator=gen(24))
    seen = {}
    original = ofd.forward

    def spy(step):
        seen.update(step.teacher_features)
        return original(step)

    ofd.forward = spy
    outputs = {}
    hooks = [distiller.teacher.get_submodule(f"layer{i}").register_forward_hook(lambda m, i, o, k=i: outputs.__setitem__(k, o.clone()))
             for i in range(1, 5)]
    distiller(Batch(images, targets, torch.zeros(len(images))))
    for h in hooks:
        h.remove()
    assert all(seen[n].min() < 0 for n in ofd.teacher_names)
    for i, n in enumerate(ofd.teacher_names, 1):  # the stage output is the ReLU of the tapped map
        assert torch.equal(seen[n].clamp_min(0), outputs[i])


def test_ofd_loss_is_the_sum_of_stage_losses_over_powers_of_two_per_image():
    distiller = make("ofd", **{"ofd.weight": 1})
    ofd = distiller.term("ofd")
    captured = {}
    original = ofd.forward

    def spy(step):
        result = original(step)
        captured.update(step.shared["ofd"])
        return result

    ofd.forward = spy
    images, targets = torch.rand(4, 3, 32, 32, generator=gen(32)), torch.randint(0, 10, (4,), generator=gen(33))
    _, out = distiller.train()(Batch(images, targets, torch.zeros(len(images))))
    n, total = len(ofd.pairs), 0.0
    for i, (s, t) in enumerate(zip([f.detach() for f in captured["student"]], captured["teacher"])):
        m = getattr(ofd, f"margin{i}").expand_as(t)
        target = torch.where(t > m, t, m)
        counted = (s > target) | (target > 0)
        total += float(((s - target) ** 2)[counted].sum()) / 2 ** (n - 1 - i)
    assert float(out["ofd"].detach()) == pytest.approx(total / 4, rel=1e-5)


def test_ofd_falls_back_to_first_batch_statistics_without_a_bn(monkeypatch):
    from lcdistill.methods import ofd as ofd_module

    real = ofd_module.pre_activation
    monkeypatch.setattr(ofd_module, "pre_activation", lambda model, names: [(tap, None) for tap, _ in real(model, names)])
    distiller = make("ofd")
    ofd = distiller.term("ofd")
    assert not ofd.margin_ready.any()
    distiller.train()(Batch(torch.rand(4, 3, 32, 32, generator=gen(25)), torch.randint(0, 10, (4,), generator=gen(26)), torch.zeros(4)))
    assert ofd.margin_ready.all() and all((m < 0).all() for m in ofd.margins())
    assert "ofd.margin_ready" in {f"ofd.{k}" for k in ofd.state_dict()}


def test_ofd_london_is_the_papers_london_on_ofd_maps():
    distiller = make("london+ofd", **{"loss.ce": 0})
    assert [t.name for t in distiller.terms] == ["ofd", "london"]  # the provider runs first
    london, ofd = distiller.term("london"), distiller.term("ofd")
    assert london.connectors is None and london.student_taps() == [] and london.teacher_taps() == []
    distiller.train()
    images, targets = torch.rand(4, 3, 32, 32, generator=gen(27)), torch.randint(0, 10, (4,), generator=gen(28))
    captured = {}
    original = ofd.forward

    def spy(step):
        result = original(step)
        captured.update(step.shared["ofd"])
        return result

    ofd.forward = spy
    _, out = distiller(Batch(images, targets, torch.zeros(len(images))))
    s_sigma = stage_sigmas(captured["student"], 20)
    t_sigma = stage_sigmas(captured["teacher"], 20)
    ref = lipschitz_loss(s_sigma, t_sigma, default_pair_weights(3), "log_mse")
    torch.testing.assert_close(out["lip"], ref)
    out["lip"].backward()
    assert all(c[0].weight.grad is not None and c[0].weight.grad.abs().sum() > 0 for c in ofd.connectors)
    # ofd weight 0: its connectors still train through the Lipschitz term
    assert make("ofd+london", **{"ofd.weight": 0}).term("ofd").trains()


def test_plain_london_is_unchanged_by_the_sharing():
    images, targets = torch.rand(4, 3, 32, 32, generator=gen(29)), torch.randint(0, 10, (4,), generator=gen(30))
    a = make("london").train()(Batch(images, targets, torch.zeros(len(images))))[1]
    b = make("kd+london").train()(Batch(images, targets, torch.zeros(len(images))))[1]
    assert set(a) == {"ce", "kd", "lip"} and all(torch.equal(a[k], b[k]) for k in a)
    london = make("london").term("london")
    assert london.connectors is not None and london.student_taps() == [s.name for s, _ in london.pairs]


# ---- the registry --------------------------------------------------------------------------------
def test_one_logit_term_per_method():
    for method in ("kd+dkd", "dist+kd+london", "dkd+london+dist"):
        with pytest.raises(UserError, match="one logit term") as e:
            methods.terms_of(method)
        assert "kd, dkd, dist" in str(e.value)
    assert [t.name for t in methods.terms_of("london")] == ["kd", "london"]
    assert [t.name for t in methods.terms_of("ofd+london")] == ["ofd", "london"]
    assert set(methods.TERMS) >= {"kd", "dkd", "dist", "ofd", "cwd", "london"}


def test_every_term_section_reaches_the_recipe_and_set():
    recipe = recipes.build([{"student": {"name": "x"}, "method": "dkd"}, recipes.parse_override("dkd.beta=2"),
                            recipes.parse_override("dist.tau=4"), recipes.parse_override("ofd.weight=1e-3"), recipes.parse_override("cwd.temperature=1")])
    assert recipe["dkd"]["beta"] == 2 and recipe["dist"]["tau"] == 4 and recipe["ofd"]["weight"] == 1e-3 and recipe["cwd"]["temperature"] == 1
    assert recipe["dkd"]["alpha"] == 1.0 and recipe["dkd"]["temperature"] == 4.0 and recipe["dkd"]["warmup_epochs"] == 20
    with pytest.raises(UserError, match="dkd.temperature"):
        recipes.build([{"student": {"name": "x"}, "method": "dkd"}, recipes.parse_override("dkd.temperature=0")])


def test_methods_command_lists_every_term(capsys):
    from conftest import cli_ok

    out = cli_ok("methods").stdout
    for name in methods.TERMS:
        assert name in out
    for word in ("Zhao", "Huang", "Heo", "Shu", "Shang", "Hinton", "ce + kd + london"):
        assert word in out, word


# ---- through the CLI -----------------------------------------------------------------------------
@pytest.mark.parametrize("method,losses", [("dist+london", {"ce", "dist", "lip"}), ("ofd+london", {"ce", "ofd", "lip"})])
def test_compositions_run_end_to_end(compress_run, method, losses):
    run = compress_run(method, "--set", "london.warmup_epochs=0")
    with open(run / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    for name in losses:
        assert math.isfinite(float(rows[0][name])), name
    assert float(rows[0]["loss"]) == pytest.approx(sum(float(rows[0][k]) for k in losses), rel=1e-4)
    assert (run / "student.safetensors").is_file()


def test_cli_refuses_cwd_on_classification_and_two_logit_terms(teacher_run, small_data, tmp_path):
    from conftest import FAST, assert_user_error, cli

    for method, words in (("cwd", ("cwd", "dense")), ("kd+dist", ("one logit term", "kd, dkd, dist"))):
        out = tmp_path / method
        result = cli("compress", "--teacher", teacher_run, "--student", "mobilenetv2_050", "--data", small_data,
                     "--method", method, *FAST, "--out", out)
        assert_user_error(result, *words, run_dir=out)
