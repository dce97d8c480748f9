"""Summarize `titan-fusion backtest` JSON reports side by side (for the ablation table in docs/quality.md).

    python scripts/backtest_summary.py reports/a/backtest.json reports/b/backtest.json ...

Per scenario and report: the fusion's log loss minus the plain average's and minus the best
baseline's (in 1e-3 nats, negative = the fusion is better) with Diebold-Mariano p-values, the edge
captured, and the accuracy difference to the average (points).
"""
import json
import sys
from pathlib import Path


def rows(path):
    d = json.loads(Path(path).read_text())
    for name, s in d["pooled"].items():
        f = s["methods"]["fusion"]
        va, vb, acc = f.get("vs_average") or {}, f.get("vs_best_baseline") or {}, f.get("accuracy_vs_average") or {}
        yield name, {"ll": f["log_loss"], "d_avg": 1e3 * va.get("mean_diff", float("nan")), "p_avg": va.get("dm_p"),
                     "d_best": 1e3 * vb.get("mean_diff", float("nan")), "p_best": vb.get("dm_p"),
                     "edge": f.get("edge_captured"), "acc": 100 * (acc.get("mean_diff") if "mean_diff" in acc else
                                                                   f["accuracy"] - s["methods"]["average"]["accuracy"]),
                     "best": s["best_baseline"], "ece_ok": f.get("ece_ok")}


def main(paths):
    table = {p: dict(rows(p)) for p in paths}
    scenarios = sorted({s for t in table.values() for s in t})
    for s in scenarios:
        print(f"\n{s}")
        for p, t in table.items():
            if s in t:
                r = t[s]
                fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
                print(f"  {Path(p).parent.name:<28} LL {r['ll']:.4f}  vs avg {r['d_avg']:+6.2f} (p {fmt(r['p_avg'])})  "
                      f"vs best[{r['best']}] {r['d_best']:+6.2f} (p {fmt(r['p_best'])})  edge {fmt(r['edge'])}  "
                      f"acc {r['acc']:+5.2f}  ece_ok {r['ece_ok']}")


if __name__ == "__main__":
    main(sys.argv[1:])
