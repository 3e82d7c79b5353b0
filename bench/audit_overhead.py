"""What the nightly audit costs: the engine with and without `--audit_fraction`, on a real model.

Not a test. Run from the repository root after `bench.real_models` trained the model:

    .venv/bin/python -m bench.audit_overhead                                  # medical abstracts dev set
    .venv/bin/python -m bench.audit_overhead --model models/ddi --fraction 0.05 --repeats 3

The audited records are the pipelines' (transforms.audit.is_audited, unkeyed salt); the engine
carries them on to the last layer after their exit (epee.engine). Printed: the stored policy's
mean exit layer and layer speedup s, the audit's extra multiply-adds and wall time as a share of
the run's full-depth cost, against the target F' x (1 - 1/s), F' the share of windows audited
(the keyed sample's realised share of the nominal F), and the extra as a share of the EPEE run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch


def main(argv: list[str] | None = None) -> None:
    from epee import EarlyExitEngine, EngineConfig, ExitPolicyConfig
    from epee.policies import ExitPolicy
    from epee.workflows.data import DataSpec, dev_set, encode_windows
    from epee.workflows.score import _kept_examples
    from transforms.audit import is_audited

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/medical_abstracts")
    p.add_argument("--data", default=None, help="labelled data to run on (default: the model's dev set)")
    p.add_argument("--fraction", type=float, default=0.02)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle, examples, _ = dev_set(args.model, DataSpec(args.data))
    encoded = encode_windows(bundle.preprocessor, examples, bundle.data_task)
    kept = _kept_examples(bundle.preprocessor, examples, bundle.data_task) if encoded.skipped else examples
    flags = [is_audited(str(kept[o].id), args.fraction, None) for o in encoded.owners]
    engine = EarlyExitEngine(bundle.model, EngineConfig(batch_size=args.batch_size))
    full_policy = ExitPolicy(ExitPolicyConfig(kind="none"), bundle.model.num_layers)
    samples = encoded.samples
    engine.run(samples[: args.batch_size])  # warm-up: first shapes

    def timed(**kw):
        times, result = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = engine.run(samples, **kw)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), result

    t_epee, plain = timed()
    t_audit, audited = timed(audit=flags)
    t_full, full = timed(policy=full_policy)
    n = len(samples)
    s = plain.stats.layer_speedup
    share = sum(flags) / n
    extra_macs = sum(r.macs - p.macs for r, p in zip(audited.audit, plain.predictions) if r is not None)
    full_macs = full.stats.macs
    target = share * (1 - 1 / s)
    print(f"model {args.model}: {n} windows ({encoded.examples} records), {sum(flags)} audited "
          f"(F {args.fraction}, realised {share:.4f}); batch {args.batch_size}, medians of {args.repeats}")
    print(f"EPEE mean exit layer {plain.stats.mean_exit_layer:.2f} of {bundle.model.num_layers}, layer speedup s {s:.2f}x")
    print(f"time: full depth {t_full:.3f} s, EPEE {t_epee:.3f} s, EPEE + audit {t_audit:.3f} s")
    print(f"audit extra MACs / full-depth MACs {extra_macs / full_macs:.4f} (target F' x (1 - 1/s) = {target:.4f}); "
          f"/ EPEE MACs {extra_macs / plain.stats.macs:.4f}")
    print(f"audit extra time / full-depth time {(t_audit - t_epee) / t_full:+.4f} (target {target:.4f}); "
          f"/ EPEE time {(t_audit - t_epee) / t_epee:+.4f}")
    print(f"rows computed: EPEE {plain.stats.rows_computed}, with audit {audited.stats.rows_computed} "
          f"(+{audited.stats.rows_computed - plain.stats.rows_computed}), full depth {full.stats.rows_computed}")


if __name__ == "__main__":
    main()
