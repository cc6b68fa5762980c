"""Quantization-aware training put on a student and taken off again.

prepare(model, example, settings): one probe forward (plan) finds the layers onnxruntime's export quantizes
(every Conv2d and Linear but the float ones lcdistill.quantize.ptq keeps: the first convolution and the last
linear layer, in the order they run), the BatchNorm that follows each convolution, and where each tensor
onnxruntime quantizes is made and read. Each quantized layer's weight gets a FoldedWeight parametrization;
each such tensor one ActQuant, once: a forward pre-hook on the layer that reads it, or a forward hook where it
is made when something else reads it too; each int8 convolution a BiasRounding hook. All of it lives under
`model.lcdistill_qat` or in hooks, so module paths, the terms' taps, checkpoints, resume and the EMA copy work
as for any student. The schedule (QatState) counts training steps: the first `calibration_steps` only watch
the activation ranges, the ranges freeze at `freeze_observers_at` of the run and the BatchNorm statistics at
`freeze_bn_at` (the fine-tuning schedule of the field's QAT recipes).

bake(model): the architecture's own state_dict with every weight on its grid, and the learnt activation
(scale, zero point) per module path; attach() puts those fixed activation quantizers (and the bias rounding)
back on a model built from the baked weights (export and its agreement check).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torchvision.ops.misc import FrozenBatchNorm2d

from lcdistill.errors import UserError
from lcdistill.quantize.fakequant import ActQuant, BiasRounding, FixedQuant, FoldedWeight, clip_search

ATTR = "lcdistill_qat"
OUT = ":out"  # an observer of a module's output (a residual branch's last BatchNorm), not of its input


class QatState(nn.Module):
    """The observers (one per quantized input, keyed by its layer's path with '.' as '/', and one per output
    planned, the path + ':out') and the step count."""

    def __init__(self, paths: list[str], momentum: float, calibration_steps: int, freeze_observers: int, freeze_bn: int):
        super().__init__()
        self.observers = nn.ModuleDict({key(p): ActQuant(momentum) for p in paths})
        self.calibration_steps, self.freeze_observers, self.freeze_bn = calibration_steps, freeze_observers, freeze_bn
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def root_pre_hook(self, model: nn.Module, args: tuple):
        """Before each training forward of the student: count the step and set what the observers do."""
        if not model.training:
            return None
        step = int(self.step)
        state = 0 if step < self.calibration_steps else 1 if step < self.freeze_observers else 2
        for observer in self.observers.values():
            observer.state = state
        if step >= self.freeze_bn:  # BatchNorm statistics frozen: eval mode for BN alone, re-set every step
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        self.step += 1
        return None


# activation modules onnxruntime takes together with the convolution before them: their output is the unit's end
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.GELU, nn.Sigmoid, nn.Hardsigmoid, nn.LeakyReLU, nn.Mish)
PASS_THROUGH = (nn.Identity, nn.Dropout)
# folded into the conv before them: BatchNorm, and torchvision's FrozenBatchNorm2d (detectors' pretrained backbones;
# always its running statistics, as a BatchNorm in eval)
NORMS = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)


FUNCTION = "<function>"  # a consumer that is a torch function called outside any leaf module (a residual `+`)


class FunctionUses(TorchFunctionMode):
    """Records the tensors torch functions take outside leaf modules (depth[0] == 0), as users of FUNCTION;
    calls that give no tensor back (size, dim) are not uses. An in-place op (`out += identity`, ReLU(inplace))
    gives a copy back, so every tensor the probe sees is one value (the probe's forward is in eval and no_grad)."""

    def __init__(self, users: dict[int, list[str]], depth: list[int]):
        super().__init__()
        self.users, self.depth = users, depth

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if isinstance(out, torch.Tensor) and (name.startswith("__i") or (name.endswith("_") and not name.startswith("_"))) \
                and any(out is a for a in args):
            out = out.clone()
        if self.depth[0] == 0 and isinstance(out, torch.Tensor):
            for a in (*args, *(kwargs or {}).values()):
                for t in (a if isinstance(a, (list, tuple)) else (a,)):
                    if isinstance(t, torch.Tensor):
                        self.users.setdefault(id(t), []).append(FUNCTION)
        return out


def plan(model: nn.Module, example: torch.Tensor) -> tuple[list[str], list[str], dict[str, str], list[str], dict[str, str]]:
    """(quantized layer paths, float layer paths, {conv path: the BatchNorm path right after it}, paths of the
    modules whose output gets an observer of its own, {quantized layer: that module} for the layers whose input
    is such an output) from one eval-mode forward of example.

    onnxruntime quantizes a tensor once, for all that read it. A tensor that only quantized layers read is
    quantized at their inputs. One that something else reads too (a residual `+`, a pooling, a float layer)
    is quantized where it is made: at the end of the conv unit that makes it (its BatchNorm, or the activation
    module after that), or at the output of the one module that returns it (a residual block whose `+` feeds
    the next block and that block's `+`); the quantized layers reading it then take it as it is."""
    order: list[str] = []
    made: dict[int, str] = {}  # id of a conv's output -> its path
    follows: dict[str, str] = {}
    ends: dict[str, int] = {}  # BatchNorm path -> id of its output
    after: dict[tuple[str, int], int] = {}  # (activation path, id of its input) -> id of its output
    users: dict[int, list[str]] = {}  # id of a tensor -> the leaf modules (and BatchNorms) and FUNCTION that took it
    returned: dict[int, list[str]] = {}  # id of a tensor -> the modules that returned it, innermost first
    calls: dict[str, int] = {}
    depth = [0]  # inside how many leaf modules the forward is
    names = {m: n for n, m in model.named_modules()}
    handles, alive = [], []  # outputs kept alive: an id is unique only while its tensor lives

    def took(module, args):
        depth[0] += 1
        if args and isinstance(args[0], torch.Tensor):
            users.setdefault(id(args[0]), []).append(names[module])

    def left(module, args, output):
        depth[0] -= 1

    def counted(module, args):
        calls[names[module]] = calls.get(names[module], 0) + 1

    def gave(module, args, output):
        if isinstance(output, torch.Tensor):
            alive.append(output)
            returned.setdefault(id(output), []).append(names[module])

    def seen(module, args, output):
        alive.append(output)
        name = names[module]
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            order.append(name)
            if isinstance(module, nn.Conv2d):
                made[id(output)] = name
            return
        if isinstance(module, NORMS):
            if args and id(args[0]) in made:
                follows[made[id(args[0])]] = name
            ends[name] = id(output)
        elif args:  # an activation, keyed by what it took too: torchvision's blocks call one ReLU twice
            after[(name, id(args[0]))] = id(output)

    for m in model.modules():
        if m is model:
            continue
        norm = isinstance(m, NORMS)
        leaf = not isinstance(m, PASS_THROUGH) and (norm or not any(True for _ in m.children()))
        handles.append(m.register_forward_pre_hook(counted))
        if leaf:
            handles.append(m.register_forward_pre_hook(took))
        if norm or isinstance(m, (nn.Conv2d, nn.Linear, *ACTIVATIONS)):
            handles.append(m.register_forward_hook(seen))
        if leaf:
            handles.append(m.register_forward_hook(left))
        handles.append(m.register_forward_hook(gave))
    was = model.training
    try:
        model.eval()
        with torch.no_grad(), FunctionUses(users, depth):
            model(example)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    runs = list(dict.fromkeys(order))  # a layer called twice is one layer
    convs = [n for n in runs if isinstance(model.get_submodule(n), nn.Conv2d)]
    linears = [n for n in runs if isinstance(model.get_submodule(n), nn.Linear)]
    keep_float = convs[:1] + linears[-1:]
    quantized = [n for n in runs if n not in keep_float]
    observed = set(quantized) | {p for p in keep_float if isinstance(model.get_submodule(p), nn.Linear)}  # layers whose input is quantized
    pairs = {c: b for c, b in follows.items() if isinstance(model.get_submodule(b), (nn.BatchNorm2d, FrozenBatchNorm2d))}

    def takers(tensor: int, producer: str) -> list[str]:
        return [u for u in users.get(tensor, []) if not u.startswith(producer + ".")]  # not its own children

    loose, shared = [], {}
    unit_outputs = set()
    for bn in dict.fromkeys(pairs.values()):
        end, tensor = bn, ends.get(bn, -1)
        taken = takers(tensor, bn)
        acts = [t for t in taken if (t, tensor) in after]
        if len(acts) == 1:  # BN -> activation: the unit ends at the activation's output (in place: the same tensor)
            end, tensor = acts[0], after[(acts[0], tensor)]
            taken = [t for t in taken if t != end] if tensor == ends[bn] else takers(tensor, end)
        unit_outputs.add(tensor)
        if calls.get(end, 1) > 1:  # an activation module called twice (torchvision's blocks): its hook would take both
            continue
        if not taken or not all(t in observed for t in taken):
            loose.append(end)
            shared.update({t: end for t in taken if t in observed})
    for tensor, modules in returned.items():  # a tensor a function made, read by a quantized layer and something else
        taken = users.get(tensor, [])
        # a hook on a module called twice would take both calls; a child added to a Sequential would run in its forward
        once = [m for m in modules if calls.get(m) == 1 and m not in observed and not isinstance(model.get_submodule(m), (nn.Sequential, nn.ModuleList))]
        if tensor in unit_outputs or tensor in made or not once:
            continue
        if any(t in observed for t in taken) and not all(t in observed for t in taken):
            loose.append(once[0])
            shared.update({t: once[0] for t in taken if t in observed})
    return quantized, keep_float, pairs, list(dict.fromkeys(loose)), shared


def prepare(model: nn.Module, example: torch.Tensor, settings: dict, total_steps: int) -> dict:
    """Put quantization-aware training on model (in place); returns what it did, for the run's header."""
    if isinstance(model, nn.Sequential):  # its forward would call every child, the observers' holder too
        raise UserError("quantization-aware training needs a model class of its own, not a bare nn.Sequential", "wrap the Sequential in a module")
    if hasattr(model, ATTR):
        raise UserError("the student is already prepared for quantization-aware training", "start from the run's student, not a checkpoint in training")
    quantized, keep_float, pairs, loose, shared = plan(model, example)
    if not quantized:
        raise UserError("the student has no Conv2d or Linear layer for int8 to quantize", "pick a convolutional student")
    # the input of every quantized layer, and of the float classifier (onnxruntime quantizes the pooling before it),
    # but for those that read a tensor quantized where it was made
    inputs = [p for p in quantized + [p for p in keep_float if isinstance(model.get_submodule(p), nn.Linear)] if p not in shared]
    state = QatState(inputs + [f"{p}{OUT}" for p in loose], float(settings["observer_momentum"]), int(settings["calibration_steps"]),
                     int(float(settings["freeze_observers_at"]) * total_steps), int(float(settings["freeze_bn_at"]) * total_steps))
    model.add_module(ATTR, state)
    bits, learnt = int(settings["weight_bits"]), learns_clip(settings)
    for path in quantized:
        layer = model.get_submodule(path)
        bn = model.get_submodule(pairs[path]) if path in pairs else None
        # learnt clipping starts where the quantized weights are closest to the trained ones
        clip = clip_search(FoldedWeight(bn, bits).folded(layer.weight), bits) if learnt else None
        parametrize.register_parametrization(layer, "weight", FoldedWeight(bn, bits, clip))
    for path in inputs:
        model.get_submodule(path).register_forward_pre_hook(state.observers[key(path)].pre_hook)
    for path in loose:
        model.get_submodule(path).register_forward_hook(state.observers[key(f"{path}{OUT}")].post_hook)
    # quantized convolutions hold their bias in int32 on the grid of input scale x weight scale: simulated. With int4
    # weights too: onnxruntime's WeightBiasQuantization optimizer rounds a float bias there when it loads the file (the
    # int4 demo student's file scored 3 points under its fake-quantized model until the simulation did the same)
    bias = {p: {"bn": pairs.get(p), "input": f"{shared[p]}{OUT}" if p in shared else p} for p in quantized
            if isinstance(model.get_submodule(p), nn.Conv2d)}
    round_biases(model, bias, lambda path: state.observers[key(path)], bits)
    model.register_forward_pre_hook(state.root_pre_hook)
    return {"quantized": len(quantized), "folded": sum(p in pairs for p in quantized), "float": keep_float, "outputs": len(loose), "bias": bias,
            "steps": total_steps, "calibration_steps": state.calibration_steps, "observers_frozen_at": state.freeze_observers,
            "bn_frozen_at": state.freeze_bn, "weight_range": "learnt" if learnt else "max"}


def learns_clip(settings: dict) -> bool:
    """qat.weight_range: learnt, max, or auto (learnt for int4 weights, whose 15 levels a few outliers would
    stretch; max for int8, where post-training int8 loses nothing on our students)."""
    mode = settings.get("weight_range", "max")
    return mode == "learnt" or (mode == "auto" and int(settings["weight_bits"]) == 4)


def key(path: str) -> str:
    """An observer's name in the ModuleDict ('.' is not allowed there)."""
    return path.replace(".", "/")


def bake(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(the plain architecture's state_dict with each quantized weight on its int8 grid, {layer path: {scale,
    zero_point}} of the learnt activation ranges). Read off the prepared model, which stays as it is (a deepcopy
    would share torch's parametrized classes, and removing the parametrizations from it breaks the original)."""
    state: QatState = getattr(model, ATTR)
    acts = {name.replace("/", "."): dict(zip(("scale", "zero_point"), obs.qparams())) for name, obs in state.observers.items() if int(obs.seen) > 0}
    suffix = ".parametrizations.weight.original"
    plain: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.startswith(ATTR + "."):
                continue
            if name.endswith(suffix):
                path = name[: -len(suffix)]
                plain[f"{path}.weight"] = model.get_submodule(path).weight.detach().clone()  # the parametrization's output
            elif ".parametrizations." not in name:
                plain[name] = tensor
    return plain, acts


def round_biases(model: nn.Module, bias: dict[str, dict], quantizer, bits: int) -> None:
    """A BiasRounding hook on each conv of bias ({conv path: {"bn": its BatchNorm or None, "input": the path of its
    input's quantizer}}) that has a bias to round (the BatchNorm's folded in, or its own); bits: the weights' width."""
    for path, where in bias.items():
        conv = model.get_submodule(path)
        bn = model.get_submodule(where["bn"]) if where["bn"] else None
        if bn is None and conv.bias is None:
            continue
        conv.register_forward_hook(BiasRounding(bn, quantizer(where["input"]), bits).hook)


def attach(model: nn.Module, activations: dict[str, dict], bias: dict[str, dict] | None = None, bits: int = 8) -> nn.Module:
    """Fixed activation quantizers (bake's second result) on a model built from baked weights, in place, and
    the int32 bias rounding of its quantized convolutions (the run's "bias" entry; bits: its "weight_bits")."""
    quantizers = {}
    for path, q in activations.items():
        quant = FixedQuant(q["scale"], q["zero_point"])
        output = path.endswith(OUT)
        layer = model.get_submodule(path[: -len(OUT)] if output else path)
        layer.add_module("lcdistill_out_quant" if output else "lcdistill_act_quant", quant)  # held by the layer: the hook's owner lives as long
        if output:
            layer.register_forward_hook(quant.post_hook)
        else:
            layer.register_forward_pre_hook(quant.pre_hook)
        quantizers[path] = quant
    round_biases(model, {p: b for p, b in (bias or {}).items() if b["input"] in quantizers}, quantizers.get, bits)
    return model
