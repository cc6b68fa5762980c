"""Hold a change to "the same student, bit for bit": train one deterministic CPU run with the code at
a base revision and one with the working tree, then compare every tensor of student.safetensors.

    python benchmarks/bitwise.py --base c44a0df            # the revision before the task layer
    python benchmarks/bitwise.py --base HEAD --methods london kd ce

The base code runs from a throwaway `git worktree` of that revision; the teacher run both students
distil from is trained once, by the base code. Exit 0 when every tensor is torch.equal, 1 otherwise.
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
# the command: a 3-epoch deterministic LONDON run on digits at 32 px
FLAGS = ["--epochs", "3", "--input-size", "32", "--batch-size", "64", "--set", "train.deterministic=true", "--seed", "0"]


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
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lcdistill-bitwise-"))
    failed = False
    try:
        base = base_tree(args.base, work)
        data, teacher = work / "digits", work / "teacher"
        lcdistill(base, "data", "digits", str(data))
        lcdistill(base, "train", "--model", "resnet18", "--data", str(data), "--epochs", "2", "--lr", "0.1", *FLAGS, "--out", str(teacher))
        for method in args.methods:
            students = {}
            for side, code in (("base", base), ("tree", REPO)):
                out = work / f"{method}-{side}"
                lcdistill(code, "compress", "--teacher", str(teacher), "--student", "mobilenetv2_050", "--data", str(data),
                          "--method", method, *FLAGS, "--out", str(out))
                students[side] = out / "student.safetensors"
            bad = compare(students["base"], students["tree"])
            failed |= bool(bad)
            verdict = "identical: every tensor torch.equal" if not bad else f"DIFFERENT: {len(bad)} tensors, e.g. {', '.join(bad[:3])}"
            print(f"{method}: student.safetensors {verdict} (base {args.base} vs working tree)")
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / "base")], capture_output=True)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
