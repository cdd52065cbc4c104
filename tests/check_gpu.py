"""``make check-gpu``: the GPU tests, then the GPU benchmarks, each under a time limit, and one summary table.

Made for a GPU machine lent for minutes: it needs what ``make setup`` installs (with the machine's CUDA build of
torch and torchvision) and nothing else, and finishes within eight minutes on one H100-class GPU. Without CUDA it
says so, checks that every GPU test is collected (and skipped) and that the benchmarks' CUDA code imports, and
exits 0.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# every test marked gpu (tests/test_gpu.py, and the families' own, such as the kNN search's)
GPU_TESTS = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:xdist", "-q", "-rs", "tests"]
# step -> (command, seconds allowed): the tests first, so that a broken CUDA path is seen before timings
STEPS = {
    "pytest -m gpu": (GPU_TESTS, 300),
    "bench/gpu.py": ([sys.executable, "bench/gpu.py", "--rounds", "5"], 180),
}


def run(name: str, command: list[str], limit: float) -> tuple[str, float, str]:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return "timed out", time.perf_counter() - start, output
    output = done.stdout + done.stderr
    print(output, end="" if output.endswith("\n") else "\n")
    return ("passed" if done.returncode == 0 else f"failed ({done.returncode})"), time.perf_counter() - start, output


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("check-gpu: no CUDA device here; checking that the GPU tests are collected and skipped, and that the")
        print("benchmarks' CUDA code imports (run make check-gpu on a GPU machine for the real check)")
        done = subprocess.run(GPU_TESTS, cwd=REPO)
        imported = subprocess.run([sys.executable, "-c", "import bench.gpu, bench.transfer, bench.fewshot"], cwd=REPO)
        return 0 if done.returncode == 0 and imported.returncode == 0 else 1
    print(f"check-gpu on {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    rows = []
    for name, (command, limit) in STEPS.items():
        print(f"== {name} (at most {limit} s)", flush=True)
        status, seconds, output = run(name, command, limit)
        summary = [line for line in output.splitlines() if " passed" in line or (": " in line and "target" in line)]
        rows.append((name, status, seconds, summary[-3:]))
    print("\n== summary")
    print(f"{'step':16s} {'status':12s} {'seconds':>8s}  lines")
    for name, status, seconds, summary in rows:
        print(f"{name:16s} {status:12s} {seconds:8.0f}  {' | '.join(summary)}")
    return 0 if all(status == "passed" for _, status, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
