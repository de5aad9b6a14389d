"""Level 7: developer tools, a sub-namespace not re-exported at the root — benchmarks, the
train-step profiler, and the one-command GPU check (the `gpu_check` subpackage, `xlstm-eqx bench gpu`); their flags
are in `xlstm_eqx.cli.bench`.
"""

from .bench import (
    BENCHMARKS as BENCHMARKS,
    bench_train as bench_train,
    matmul_flops as matmul_flops,
    print_train_table as print_train_table,
    run_bench as run_bench,
    train_step_setup as train_step_setup,
)
from .gpu_check import estimate_durations as estimate_durations, run_gpu_check as run_gpu_check
from .profile import (
    PARTS as PARTS,
    OpTime as OpTime,
    StepProfile as StepProfile,
    hlo_instructions as hlo_instructions,
    print_profile as print_profile,
    profile_calls as profile_calls,
    profile_train_step as profile_train_step,
    trace_self_times as trace_self_times,
)
