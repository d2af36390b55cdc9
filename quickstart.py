"""The whole pipeline on a fresh machine, in minutes on two CPU cores, with nothing downloaded:

    python quickstart.py [--workdir runs/quickstart]

1. generates synthetic thin-structure data (training and validation sets) under WORKDIR/data if absent;
2. trains the tiny Pi-SAM recipe (``configs/tiny.py``): stage 1, the HR Mask Decoder, then stage 2,
   the Precise Interactor, each resuming if WORKDIR already holds a run;
3. evaluates the trained model on the validation set, box prompts then 1 and 2 correcting clicks,
   and prints the report: tables like the paper's, and where the plots and overlays are.

Each step is the command a user would type (printed before it runs), so this file only wires them.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

EVAL_SET = ("DIS5K/DIS-VD", 6, 1)  # folder under the data root, images, seed


def run(cmd: list[str]) -> None:
    print("\n$ " + shlex.join(cmd), flush=True)
    code = subprocess.call(cmd)
    if code:
        sys.exit(code)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/quickstart")
    parser.add_argument("--steps", type=int, default=100, help="training steps of each stage")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    data = work / "data"
    py = sys.executable

    folder, n, seed = EVAL_SET
    if not (data / folder / "gt").is_dir():
        run([py, "-m", "pisam_jax.data.synthetic", "--out", str(data / folder), "--n", str(n), "--size", "384",
             "--seed", str(seed)])  # fmt: skip
    common = [f"--config.data.data_root={data}", f"--config.max_steps={args.steps}"]  # stage 1 makes the training data
    run([py, "train.py", "--config=configs/tiny.py:stage1", f"--workdir={work / 'stage1'}", *common])
    run([py, "train.py", "--config=configs/tiny.py:stage2", f"--workdir={work / 'stage2'}", *common,
         f"--config.init_from={work / 'stage1'}"])  # fmt: skip
    run([py, "eval.py", f"--model={work / 'stage2' / 'export'}", f"--data_root={data}", "--datasets=DIS5K-VD",
         f"--out={work / 'eval'}", "--clicks=1,2", f"--subset={n}"])  # fmt: skip
    print(f"\nquickstart done: models in {work}/stage1/export and {work}/stage2/export, report in {work}/eval")


if __name__ == "__main__":
    main()
