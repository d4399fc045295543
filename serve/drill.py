"""Load and fault drill (prints figures, writes JSON and a plot): c=32 load on /search/text while
one Encoder replica and one MoleculeShard replica are killed, then a fuzz run. The library is
served as a shard deployment (`search_in_ingress=false`, the topology of a sharded library): by
default a single shard is searched in the ingress and there would be no shard replica to kill.

    python serve/drill.py --model runs/cpu/best --library runs/index/molecules --out results/drill

Counts every request that failed as the client saw it (the ingress retries an idempotent search
once on a dead replica), the time until each killed deployment is back to its replica count,
whether the answers after the drill equal those before it, the replica count of every deployment
over time under load and after it (drill.png), and --fuzz random requests (5xx must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve.benchmark import fuzz, short_queries, start_local_serve  # noqa: E402

QUERIES = short_queries(5)


def replica_counts(app: str = "tmr") -> dict[str, int]:
    from ray import serve

    deployments = serve.status().applications[app].deployments
    return {name: status.replica_states.get("RUNNING", 0) for name, status in deployments.items()}


def kill_one_replica(deployment: str, app: str = "tmr") -> str:
    """ray.kill one live replica of the deployment (found by Serve's actor name), no restart."""
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#"):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return actor["name"]
    raise RuntimeError(f"no live replica of {deployment}")


async def drill(port: int, seconds: float, concurrency: int, kills: list[tuple[float, str]]) -> dict:
    events, samples, outcomes = [], [], []
    started = time.perf_counter()
    stop = started + seconds

    async def worker(client: httpx.AsyncClient, number: int):
        i = number
        while time.perf_counter() < stop:
            body = {"text": QUERIES[i % len(QUERIES)] + f" ({i})", "k": 10}
            t0 = time.perf_counter()
            try:
                status = (await client.post("/search/text", json=body)).status_code
            except httpx.HTTPError as error:
                status = type(error).__name__
            outcomes.append({"t": t0 - started, "status": status, "ms": 1000 * (time.perf_counter() - t0)})
            i += concurrency

    async def chaos(at: float, deployment: str):
        """One kill at its time (whatever the other kills' recoveries), then the wait until the
        deployment is back to its replica count."""
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - started)))
        before = (await asyncio.to_thread(replica_counts))[deployment]
        name = await asyncio.to_thread(kill_one_replica, deployment)
        killed = time.perf_counter() - started
        event = {"t": killed, "deployment": deployment, "replica": name, "replicas_before": before}
        events.append(event)
        seen_down = False
        while True:
            await asyncio.sleep(0.25)
            count = (await asyncio.to_thread(replica_counts))[deployment]
            seen_down = seen_down or count < before
            if seen_down and count >= before or time.perf_counter() - started - killed > 120:
                event["recovered_s"] = time.perf_counter() - started - killed if count >= before else None
                break

    async def sampler(until: float):
        while time.perf_counter() - started < until:
            samples.append({"t": time.perf_counter() - started, **(await asyncio.to_thread(replica_counts))})
            await asyncio.sleep(1.0)

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        load = [worker(client, n) for n in range(concurrency)]
        await asyncio.gather(*load, *[chaos(at, deployment) for at, deployment in kills], sampler(seconds))
        await sampler(seconds + 60)  # after the load: the autoscaler scales back down
    failed = [o for o in outcomes if o["status"] != 200]
    return {"requests": len(outcomes), "failed": len(failed), "failures": failed[:20], "kills": events,
            "replicas": samples, "qps": len(outcomes) / seconds}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["drill"]["replicas"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for name in [k for k in samples[0] if k != "t"]:
        ax.step([s["t"] for s in samples], [s.get(name, 0) for s in samples], where="post", label=name)
    for kill in report["drill"]["kills"]:
        ax.axvline(kill["t"], color="red", linestyle=":", linewidth=1)
        ax.text(kill["t"], ax.get_ylim()[1] * 0.95, f" kill {kill['deployment']}", color="red", fontsize=8, va="top")
    ax.axvspan(0, report["seconds"], color="grey", alpha=0.1, label=f"c={report['concurrency']} load")
    ax.set_xlabel("seconds")
    ax.set_ylabel("running replicas")
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # replicas come whole
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from ray import serve

    from serve.app import build_app

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--library", required=True, help="index directory (jobs/index.py)")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--fuzz", type=int, default=10_000)
    parser.add_argument("--out", default="results/drill")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = start_local_serve()
    # the shard as its own deployment (as a library of N shards is), so that there is a shard replica to kill
    serve.run(build_app({"model_dir": args.model, "molecules": args.library, "encoder_max_replicas": 2,
                         "downscale_delay_s": 20, "search_in_ingress": "false"}), name="tmr", route_prefix="/")
    reference = [{"text": q, "k": 10} for q in QUERIES]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        before = [[r["id"] for r in client.post("/search/text", json=b).json()["results"]] for b in reference]
    kills = [(args.seconds / 4, "Encoder"), (args.seconds / 2, "MoleculeShard0")]
    report = {"library": args.library, "seconds": args.seconds, "concurrency": args.concurrency,
              "drill": asyncio.run(drill(port, args.seconds, args.concurrency, kills))}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        after = [[r["id"] for r in client.post("/search/text", json=b).json()["results"]] for b in reference]

    async def fuzz_run():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            return await fuzz(client, args.fuzz)

    report["answers_after_equal_before"] = after == before
    report["fuzz"] = asyncio.run(fuzz_run()) if args.fuzz else None
    serve.shutdown()
    plot(report, out / "drill.png")
    (out / "drill.json").write_text(json.dumps(report, indent=2))
    summary = {k: v for k, v in report["drill"].items() if k not in ("replicas", "failures")}
    print(json.dumps({**summary, "answers_after_equal_before": report["answers_after_equal_before"],
                      "fuzz": report["fuzz"]}, indent=2))


if __name__ == "__main__":
    main()
