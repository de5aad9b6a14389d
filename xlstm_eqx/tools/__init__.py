"""Level 7: developer tools, a sub-namespace not re-exported at the root — benchmarks and the
train-step profiler.
"""

from .bench import (
    BENCHMARKS as BENCHMARKS,
    add_bench_arguments as add_bench_arguments,
    bench_train as bench_train,
    matmul_flops as matmul_flops,
    print_train_table as print_train_table,
    run_bench as run_bench,
    run_bench_command as run_bench_command,
    train_step_setup as train_step_setup,
)
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
