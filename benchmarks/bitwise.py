"""Hold a change to "the same student, bit for bit": train one deterministic CPU run with the code at
a base revision and one with the working tree, then compare every tensor of student.safetensors.

    python benchmarks/bitwise.py --base cd1242f            # before the model boundary: both tasks, london
    python benchmarks/bitwise.py --base HEAD --methods london kd ce --tasks classification

Each task runs its own setting: classification a resnet18 teacher and a mobilenetv2_050 student on
digits at 32 px; segmentation an smp FPN resnet18 teacher and an FPN mobilenetv3 student on 200
digit scenes at 64 px (the task's default augmentation, no data.scale given). The base code runs
from a throwaway `git worktree` of that revision; the teacher run both students distil from is
trained once, by the base code. Exit 0 when every tensor is torch.equal, 1 otherwise.
Bitwise equality holds on one machine and one torch build; run both sides here, never compare with
a file made elsewhere.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DETERMINISTIC = ["--set", "train.deterministic=true", "--seed", "0", "--workers", "0"]
# per task: (data command, teacher model, student, flags): a deterministic CPU run of each
SETTINGS = {
    "classification": (["data", "digits"], "resnet18", "mobilenetv2_050",
                       ["--epochs", "3", "--input-size", "32", "--batch-size", "64", *DETERMINISTIC]),
    # every schedule key spelled out (as the core defaults were at cd1242f), so a later change of the
    # task's own defaults does not move the comparison; cd1242f..HEAD also held with data.scale unset
    "segmentation": (["data", "digit-scenes", "--images", "200"], "smp:FPN:resnet18", "smp:FPN:tu-mobilenetv3_small_100",
                     ["--epochs", "2", "--input-size", "64", "--batch-size", "8", "--set", "schedule.optimizer=adamw", "--lr", "0.008",
                      "--set", "schedule.weight_decay=5e-5", "--set", "schedule.warmup_epochs=0", "--set", "data.hflip=0",
                      "--set", "data.scale=[0.5,2.0]", *DETERMINISTIC]),
}


def base_tree(rev: str, work: Path) -> Path:
    """A detached worktree of rev whose package also finds its own recipes (as the wheel ships them)."""
    tree = work / "base"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(tree), rev], check=True, capture_output=True)
    shutil.copytree(tree / "recipes", tree / "lcdistill" / "recipes", dirs_exist_ok=True)
    return tree


def lcdistill(code: Path, *args: str) -> None:
    """`python -m lcdistill ARGS` with the package imported from `code` (not the installed one)."""
    env = {**os.environ, "PYTHONPATH": str(code), "LCDISTILL_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lcdistill", *args], cwd=code, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"lcdistill {' '.join(args)} failed ({code}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"  {time.perf_counter() - start:5.1f}s  lcdistill {' '.join(args[:1])} ({'base' if code != REPO else 'working tree'})")


def compare(a: Path, b: Path) -> list[str]:
    """Names of tensors that differ (or exist on one side only)."""
    import torch
    from safetensors.torch import load_file

    left, right = load_file(str(a)), load_file(str(b))
    bad = sorted(set(left) ^ set(right))
    bad += [k for k in sorted(set(left) & set(right)) if left[k].dtype != right[k].dtype or not torch.equal(left[k], right[k])]
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision to hold the working tree to")
    parser.add_argument("--methods", nargs="+", default=["london"], help="methods to compare (default: london)")
    parser.add_argument("--tasks", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="tasks to compare (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lcdistill-bitwise-"))
    failed = False
    try:
        base = base_tree(args.base, work)
        for task in args.tasks:
            make_data, teacher_model, student_model, flags = SETTINGS[task]
            data, teacher = work / f"{task}-data", work / f"{task}-teacher"
            lcdistill(base, *make_data, str(data))
            lcdistill(base, "train", "--model", teacher_model, "--data", str(data), *flags, "--out", str(teacher))
            for method in args.methods:
                students = {}
                for side, code in (("base", base), ("tree", REPO)):
                    out = work / f"{task}-{method}-{side}"
                    lcdistill(code, "compress", "--teacher", str(teacher), "--student", student_model, "--data", str(data),
                              "--method", method, *flags, "--out", str(out))
                    students[side] = out / "student.safetensors"
                bad = compare(students["base"], students["tree"])
                failed |= bool(bad)
                verdict = "identical: every tensor torch.equal" if not bad else f"DIFFERENT: {len(bad)} tensors, e.g. {', '.join(bad[:3])}"
                print(f"{task} {method}: student.safetensors {verdict} (base {args.base} vs working tree)", flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / "base")], capture_output=True)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
