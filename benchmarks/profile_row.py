"""Where the time of one benchmark row goes: torch.profiler over a few calls, top operators by self CPU time.

python benchmarks/profile_row.py runs/squad_offline/int8_static/model --length-config 269,189,133,94,66,47 \
    --batch-size 32 --out benchmarks/results/bench/profile_int8.txt

An INT8 artifact (quantization.json) is profiled through qala.quantize.CompiledQA after one compiling
call, an fp32 directory eagerly; inputs are the first dev.json windows the benchmark uses
(its inputs.safetensors).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from qala.bench.peers import call_model
from qala.bench.worker import load_inputs, make_batch
from qala.quantize.load import load_model, model_kind
from qala.utils import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--length-config", default=None, help="comma-separated kept lengths (default: full)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--inputs", type=Path, default=Path("benchmarks/results/bench/inputs.safetensors"))
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.length_config.split(",")] if args.length_config else None
    backend = model_kind(args.model)
    model = load_model(args.model, compiled=backend == "int8")  # INT8 as served: CompiledQA
    batch = make_batch(load_inputs(args.inputs), args.batch_size)
    call_model(model, batch, length_config=lengths)  # compiles an INT8 graph; warms caches either way
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.calls):
            call_model(model, batch, length_config=lengths)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    header = (
        f"# {args.model} ({backend}), length_config={lengths}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, {args.calls} calls, torch {torch.__version__}\n"
    )
    atomic_write_text(args.out, header + table + "\n")
    print(header + table)


if __name__ == "__main__":
    main()
