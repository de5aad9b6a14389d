"""The GPU check: correctness of the kernels on the device, kernel speed, train step, generation.

    python benchmarks/gpu_check.py --out DIR [--quick] [--parts correctness,kernels,train,generate]
    python benchmarks/gpu_check.py --estimate

The same as `xlstm-eqx bench gpu` (`xlstm_eqx.tools.gpu_check`; flags in `xlstm_eqx.cli.bench`):
writes DIR/gpu_check.json and DIR/gpu_check.md after every case; exit code 1 if a correctness
check failed.
"""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from xlstm_eqx.cli.bench import gpu_check_main  # noqa: E402


if __name__ == "__main__":
    raise SystemExit(gpu_check_main())
