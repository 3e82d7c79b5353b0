"""PyTorch's float32 linear (MKL) against oneDNN's on this CPU, alone and in the engine. Not a test.

On x86-64 CPUs the engine runs its float32 linear layers through oneDNN by default
(``--linear_kernel auto``, :mod:`epee.kernels`, token rows padded to bounded sizes): on the AMD
EPYC machines our benchmarks ran on it was about 20% faster in the engine than PyTorch's default
(MKL). Another CPU may differ; this script says which is faster (``--linear_kernel aten`` keeps
PyTorch's). Its memory is measured by ``bench.scaling``, not here: see docs/analyses.md.

1. One linear layer per shape of a BERT-style layer (hidden H: H->H, H->4H, 4H->H) on M token rows,
   each kernel timed alternately over ``--reps`` rounds; prints ms per call, the ratio and GFLOP/s,
   beside a square 2048 matmul's GFLOP/s (what this machine's float32 peak is in practice).
2. With ``--model DIR`` (a trained model directory, e.g. ``models/medical_abstracts``), the engine
   over that corpus' test half (as ``bench.run_all`` measures it) with each kernel, alternating
   rounds: records/s, and whether both gave the same exit layers and labels; also oneDNN with
   BERT's GELU as a second pass (``onednn, GELU unfused``), what the engine ran before GELU was
   fused into the up-projection (:func:`epee.kernels.linear_gelu`).

    .venv/bin/python -m bench.kernels
    .venv/bin/python -m bench.kernels --model models/medical_abstracts --reps 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from bench.common import machine, timed


def time_call(fn, n: int) -> float:
    """Milliseconds per call of ``fn``: the mean of ``n`` calls after two warm-up calls."""
    with torch.inference_mode():
        return 1e3 * timed(fn, repeat=n, warmup=2, reduce="mean")


def main(argv: list[str] | None = None) -> None:
    from epee.kernels import OneDNNLinear, onednn_linear_available

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=384, help="hidden size (MiniLM-L6: 384; BERT-base: 768)")
    p.add_argument("--rows", type=int, default=32 * 125, help="token rows per call (32 records x 125 tokens)")
    p.add_argument("--calls", type=int, default=20, help="calls per timing")
    p.add_argument("--reps", type=int, default=3, help="rounds, alternating the kernels")
    p.add_argument("--model", help="also time the engine on this model directory's test half")
    p.add_argument("--max-test", type=int, default=500)
    args = p.parse_args(argv)
    if not onednn_linear_available():
        raise SystemExit("this PyTorch build has no oneDNN linear op: the engine uses PyTorch's own")
    print(f"{machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d %H:%M')}\n")
    side = 2048
    left, right = torch.randn(side, side), torch.randn(side, side)
    matmul_ms = statistics.median(time_call(lambda: left @ right, 5) for _ in range(args.reps))
    peak = 2 * side**3 / matmul_ms / 1e6  # GFLOP/s
    print(f"Square {side} float32 matmul (PyTorch), this machine's practical peak: {peak:.0f} GFLOP/s\n")
    print(f"| linear (rows {args.rows}) | PyTorch (aten) ms | oneDNN ms | aten / oneDNN | aten GFLOP/s | oneDNN GFLOP/s |")
    print("|---|---|---|---|---|---|")
    h = args.hidden
    torch.manual_seed(0)
    for fan_in, fan_out in ((h, h), (h, 4 * h), (4 * h, h)):
        lin = torch.nn.Linear(fan_in, fan_out).eval()
        x = torch.randn(args.rows, fan_in)
        mode = OneDNNLinear()

        def onednn():
            with mode:
                lin(x)

        times: dict[str, list[float]] = {"aten": [], "onednn": []}
        for _ in range(args.reps):
            times["aten"].append(time_call(lambda: lin(x), args.calls))
            times["onednn"].append(time_call(onednn, args.calls))
        a, o = statistics.median(times["aten"]), statistics.median(times["onednn"])
        flops = 2 * args.rows * fan_in * fan_out / 1e9
        print(f"| {fan_in} -> {fan_out} | {a:.2f} | {o:.2f} | {a / o:.2f}x | {flops / a * 1e3:.0f} | {flops / o * 1e3:.0f} |")
    gelu_row(args)
    if args.model:
        engine_rows(args)


def gelu_row(args) -> None:
    """BERT's up-projection and its GELU: two passes against one oneDNN call with GELU fused."""
    from epee.kernels import OneDNNLinear, linear_gelu

    h = args.hidden
    lin = torch.nn.Linear(h, 4 * h).eval()
    x = torch.randn(args.rows, h)
    mode = OneDNNLinear()

    def separate():
        with mode:
            torch.nn.functional.gelu(lin(x))

    def fused():
        with mode:
            linear_gelu(x, lin)

    times: dict[str, list[float]] = {"aten": [], "separate": [], "fused": []}
    for _ in range(args.reps):
        times["aten"].append(time_call(lambda: torch.nn.functional.gelu(lin(x)), args.calls))
        times["separate"].append(time_call(separate, args.calls))
        times["fused"].append(time_call(fused, args.calls))
    a, s, f = (statistics.median(times[k]) for k in ("aten", "separate", "fused"))
    print(f"\n| {h} -> {4 * h} then GELU | PyTorch (aten) ms | oneDNN, GELU a second pass ms | oneDNN, GELU fused ms |")
    print("|---|---|---|---|")
    print(f"| rows {args.rows} | {a:.2f} | {s:.2f} | {f:.2f} |")


@contextlib.contextmanager
def gelu_unfused():
    """The engine with BERT's GELU as its own pass after oneDNN's up-projection (before fusion)."""
    import epee.kernels as kernels

    saved = kernels.fusable_gelu_ffn
    kernels.fusable_gelu_ffn = lambda layer: False
    try:
        yield
    finally:
        kernels.fusable_gelu_ffn = saved


def engine_rows(args) -> None:
    from bench.common import encode_examples, halves
    from bench.run_all import held_out
    from epee import EarlyExitEngine, EngineConfig

    bundle, examples = held_out(args.model)
    samples = encode_examples(bundle, halves(examples)[1][: args.max_test])[0]
    # label -> (linear kernel, GELU fused); unfused: BERT's GELU as a second pass, as before linear_gelu
    variants = {"aten": ("aten", True), "onednn": ("onednn", True), "onednn, GELU unfused": ("onednn", False)}
    rates: dict[str, list[float]] = {label: [] for label in variants}
    outcome: dict[str, list] = {}
    EarlyExitEngine(bundle.model, EngineConfig(batch_size=32)).run(samples[:64])  # warm-up
    for _ in range(args.reps):
        for variant, (kernel, fused) in variants.items():
            engine = EarlyExitEngine(bundle.model, EngineConfig(batch_size=32, linear_kernel=kernel))
            with contextlib.nullcontext() if fused else gelu_unfused():
                t0 = time.perf_counter()
                result = engine.run(samples)
                rates[variant].append(len(samples) / (time.perf_counter() - t0))
            outcome[variant] = [(q.exit_layer, q.label) for q in result.predictions]
    same = min(sum(a == b for a, b in zip(outcome["aten"], v)) for v in outcome.values())
    mean_exit = statistics.mean(e for e, _ in outcome["onednn"])
    print(f"\nengine on {args.model}, test half: {len(samples)} records, stored policy, mean exit layer {mean_exit:.2f}; "
          f"same exit layer and label as PyTorch's kernel in every variant: {same}/{len(samples)}\n")
    print("| kernel | records/s per round | median |")
    print("|---|---|---|")
    for kernel, v in rates.items():
        print(f"| {kernel} | {' '.join(f'{x:.1f}' for x in v)} | {statistics.median(v):.1f} |")


if __name__ == "__main__":
    main()
