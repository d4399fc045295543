"""Ray job: train tmr with Ray Train + DeepSpeed.

    python jobs/train.py --config cpu --workers 2                     # starts a local Ray
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train.py --config cpu --workers 2 output=runs/cpu   # on a running cluster
    python jobs/train.py --config paper --workers 8 --gpu              # a GPU cluster

Running again with the same output directory resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from tmr.config import load_config
from tmr.data.sources import resolve_run_inputs
from tmr.distributed import init_ray, train_with_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu", help="preset (paper, cpu, clip, tiny) or YAML file")
    parser.add_argument("--data", help="data root holding {train,validation,test}.txt")
    parser.add_argument("--workers", type=int, help="Ray Train workers (overrides train.num_workers)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, nccl (overrides train.use_gpu)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of a local Ray (no cluster)")
    parser.add_argument("overrides", nargs="*", help="key.path=value, e.g. train.epochs=3 model.projector.memory_size=0")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:  # what no retry can fix is reported here, in seconds, before Ray or any worker starts
        config = load_config(args.config, args.overrides)
        if args.data:
            config.data = args.data
        if args.workers:
            config.train.num_workers = args.workers
        if args.gpu:
            config.train.use_gpu = True
        resolve_run_inputs(config)
    except (OSError, ValueError, KeyError) as error:
        sys.exit(f"jobs/train.py: {error.args[0] if isinstance(error, KeyError) else error}")
    init_ray(args.num_cpus)
    metrics = train_with_ray(config)
    print(json.dumps({"output": config.output, "best_epoch": metrics["best_epoch"],
                      "validation": metrics["validation"]}, indent=2))


if __name__ == "__main__":
    main()
