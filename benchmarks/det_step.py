"""Step cost of each detection term against the detector's own loss alone, measured side by side.

    python benchmarks/det_step.py [--rounds 5] [--steps 3] [--size 64] [--batch 8]

Builds a det:FCOS:resnet18 teacher and a det:FCOS:mobilenet_v3_small student (random weights: the cost
of a step does not depend on them), then times one optimizer step of each method in interleaved rounds
(each method once per round, so load from other processes falls on all alike) and prints the median
step time and its ratio to `ce` (the detector's loss alone). The step is the trainer's: the distiller's
forward on a Batch, the summed losses, backward, AdamW.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lcdistill import methods, models, recipe as recipes, tasks
from lcdistill.tasks import Batch

METHODS = ("ce", "ce+teacher pass", "kd", "cwd", "pkd", "ce+london", "kd+london")
# "ce+teacher pass": the detector's loss plus the teacher's no-grad pass that every term needs, and no term:
# what any term costs at least, so each term's own share is its row minus this one


def batch(size: int, n: int) -> Batch:
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=gen) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[4.0, 4, size / 2, size / 2], [size / 3, size / 3, size - 2, size - 2]]),
                "labels": torch.tensor([1, 2]), "ignore": torch.tensor([False, False])} for _ in range(n)]
    return Batch(images, targets)


def step_fn(method: str, size: int):
    task = tasks.get("detection")
    torch.manual_seed(0)
    loaded = [models.resolve(name, 10, pretrained=False, task="detection") for name in ("det:FCOS:mobilenet_v3_small", "det:FCOS:resnet18")]
    for m in loaded:
        task.configure(m, size)
    teacher_pass = method == "ce+teacher pass"
    method = "ce" if teacher_pass else method
    recipe = recipes.build([{"student": {"name": "det:FCOS:mobilenet_v3_small"}, "method": method, "data": {"input_size": size},
                             "london": {"warmup_epochs": 0}}], task.recipe_defaults)
    distiller = methods.build(recipe, task, loaded[0].model, loaded[1].model, loaded[0].data_config, loaded[1].data_config)
    optimizer = torch.optim.AdamW(distiller.parameters(), lr=1e-4)
    distiller.train()

    def step(b: Batch) -> None:
        _, losses = distiller(b)
        if teacher_pass:  # as the distiller does for a term (methods/base.py), its result unused
            with torch.no_grad():
                task.forward(loaded[1].model.eval(), b, (loaded[1].data_config["mean"], loaded[1].data_config["std"]), predict=False)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps timed per method per round")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    b = batch(args.size, args.batch)
    steps = {m: step_fn(m, args.size) for m in METHODS}
    for fn in steps.values():  # warm-up
        fn(b)
    times = {m: [] for m in METHODS}
    for _ in range(args.rounds):
        for m, fn in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                fn(b)
            times[m].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["ce"])
    print(f"threads {torch.get_num_threads()}, batch {args.batch} at {args.size} px, {args.rounds} rounds x {args.steps} steps")
    print("| method | step s (median) | / ce |")
    print("|---|---|---|")
    for m in METHODS:
        med = statistics.median(times[m])
        print(f"| {m} | {med:.3f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
