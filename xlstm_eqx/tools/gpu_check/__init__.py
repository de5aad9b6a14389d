"""The GPU check: correctness of the kernels on the device, kernel speed, the train step and
generation, in one run (`run_gpu_check`; its flags are `xlstm-eqx bench gpu`'s, in
`xlstm_eqx.cli.bench`).

Modules: `run` (the entry point: parts, budgets, the summary), `settings` (the cases of the quick
and full modes, tolerances, FLOP counts, datasheet peaks), `report` (`gpu_check.json` / `.md`, the
per-part budgets, the random inputs and error measures the parts share), one module per part
(`correctness`, `kernels`, `train`, `generate`, `context`) and `estimate` (the expected durations).
"""

from .estimate import estimate_durations as estimate_durations, format_estimate as format_estimate
from .run import run_gpu_check as run_gpu_check
from .settings import (
    FULL as FULL,
    JSON_NAME as JSON_NAME,
    MD_NAME as MD_NAME,
    PARTS as PARTS,
    PEAK_BF16_TFLOPS as PEAK_BF16_TFLOPS,
    QUICK as QUICK,
    AttentionCase as AttentionCase,
    CellCase as CellCase,
    CheckSettings as CheckSettings,
    chunkwise_flops as chunkwise_flops,
    peak_bf16_flops as peak_bf16_flops,
)
