"""
The rebalancing curve: open connections per backend over time after a
backend comes back, with rebalance = off and with rebalance = gradual
(alone and with slow_start).

Each scenario runs in this process on 127.0.0.1: three Autobahn echo
backends a, b, c and an lbws (least_conn) in front of them. c is down while
CLIENTS clients connect (so a and b get half each); then c comes back. The
clients reconnect at once when lbws closes them with 1012, as real ones
should. Connections per backend are sampled every SAMPLE seconds.

    .venv/bin/python bench/rebalance_curve.py [--clients 300] [--rate 20]
        [--seconds 14] [--png etc/rebalance.png] [--json bench/results/rebalance.json]

Prints a summary per scenario; writes the plot (matplotlib, as installed by
bench/setup.sh) and the samples as JSON.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.task import LoopingCall  # noqa: E402

SAMPLE = 0.1
HEALTH = "interval = 0.2\ntimeout = 0.5\nfall = 1\nrise = 2"


async def scenario(reactor, name, lbwsExtra, clients, seconds):
    from tests.balancing import Fleet, RevivableBackend
    from tests.support import eventually, startLbws

    a, b, c = (RevivableBackend(n) for n in "abc")
    a.start()
    b.start()
    lbws = await startLbws(
        [(x.name, x.url) for x in (a, b, c)], lbws=lbwsExtra, health=HEALTH
    )
    fleet = Fleet(lbws.url)
    try:
        await eventually(lambda: lbws.pool["c"].state == "down")
        await fleet.connect(clients)
        counts = lambda: [lbws.pool[n].active for n in "abc"]  # noqa: E731
        samples = []
        start = reactor.seconds()
        sampler = LoopingCall(lambda: samples.append([reactor.seconds() - start, *counts()]))
        sampler.clock = reactor
        sampler.start(SAMPLE)
        await task.deferLater(reactor, 1.0)
        c.start()
        await eventually(lambda: lbws.pool["c"].state == "up")
        upAt = reactor.seconds() - start
        await task.deferLater(reactor, seconds)
        sampler.stop()
        moves = lbws.rebalancer.moved
        result = {
            "name": name,
            "config": lbwsExtra.strip().replace("\n", "; ") or "rebalance = off",
            "clients": clients,
            "c_up_at": upAt,
            "samples": samples,
            "moved": moves,
            "lost": len(fleet.lost),
            "final": counts(),
        }
        fair = clients / 3
        within = [s[0] - upAt for s in samples if s[0] >= upAt and all(abs(n - fair) <= fair * 0.1 for n in s[1:])]
        result["seconds_to_within_10pct"] = within[0] if within else None
        # The busiest second of moves, from c's samples (each move lands there).
        perSecond = 0
        for i, s in enumerate(samples):
            later = [t for t in samples[i:] if t[0] <= s[0] + 1.0]
            perSecond = max(perSecond, later[-1][3] - s[3])
        result["max_moves_in_1s"] = perSecond if moves else 0
        return result
    finally:
        fleet.close()
        await lbws.stopService()
        for x in (a, b, c):
            await x.close()


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), sharey=True)
    colors = {"a": "#1f77b4", "b": "#ff7f0e", "c": "#2ca02c"}
    for ax, result in zip(axes, results):
        up = result["c_up_at"]
        times = [s[0] - up for s in result["samples"]]
        for i, name in enumerate("abc"):
            ax.plot(times, [s[i + 1] for s in result["samples"]], label=f"backend {name}", color=colors[name])
        ax.axhline(result["clients"] / 3, color="grey", linestyle=":", linewidth=1, label="fair share")
        ax.axvline(0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(result["config"], fontsize=9)
        ax.set_xlabel("seconds since backend c came back")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("open connections")
    axes[0].legend(loc="center left", fontsize=8)
    fig.suptitle(
        f"lbws: {results[0]['clients']} long-lived WebSocket connections, backend c down, then back",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


async def main(reactor, args):
    rate = args.rate
    runs = [
        ("rebalance = off", ""),
        ("rebalance = gradual", f"rebalance = gradual\nrebalance_rate = {rate:g}\n"),
        (
            "gradual + slow_start",
            f"rebalance = gradual\nrebalance_rate = {rate:g}\nslow_start = {args.slow_start:g}\n",
        ),
    ]
    results = []
    for name, extra in runs:
        result = await scenario(reactor, name, extra, args.clients, args.seconds)
        results.append(result)
        print(
            f"{name:22} moved {result['moved']:4}  final a/b/c {result['final']}"
            f"  within 10% of fair share after {result['seconds_to_within_10pct']}"
            f" s  busiest second {result['max_moves_in_1s']} moves  lost {result['lost']}",
            flush=True,
        )
    plot(results, Path(args.png))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rate": rate, "runs": results}, indent=1))
    print(f"wrote {args.png} and {args.json}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--rate", type=float, default=20)
    parser.add_argument("--slow-start", type=float, default=8)
    parser.add_argument("--seconds", type=float, default=14)
    parser.add_argument("--png", default=str(ROOT / "etc" / "rebalance.png"))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "rebalance.json"))
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))
