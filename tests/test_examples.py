"""The examples run (a few steps of a tiny config)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: semask_swin_tiny, narrow and shallow (every stage, window and semantic layer kept).
TINY = ["--model", "semask_swin_tiny", "--batch", "2", "--size", "64", "--num-classes", "5", "--device", "cpu",
        "--cfg", "embed_dim=32", "--cfg", "num_heads=(1, 2, 4, 8)", "--cfg", "depths=(2, 2, 2, 2)",
        "--cfg", "channels=32"]


def test_train_synthetic_cli_runs_two_steps_with_a_progress_bar():
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "train_synthetic.py"), *TINY, "--steps", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "semask_swin_tiny:" in run.stdout
    assert "2/2" in run.stderr and "loss=" in run.stderr and "img_s=" in run.stderr  # the tqdm bar


def test_train_synthetic_loss_goes_down():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import train_synthetic
    finally:
        sys.path.remove(str(ROOT / "examples"))
    losses = train_synthetic.main(TINY + ["--steps", "6", "--lr", "1e-3"])
    assert len(losses) == 6 and losses[-1] < losses[0]
