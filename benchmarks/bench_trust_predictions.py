"""The predicted step of ``bench_planner_trust.py``'s layouts (and a free search on 2 and 4 ranks) without profiles:
what ``meshwright plan`` picks and predicts for each, one JSON line per layout. Run it on two trees to see how a
cost-model change moves the plan-accuracy layouts without re-running the trainings:

    PYTHONPATH=<tree> python benchmarks/bench_trust_predictions.py
"""

from __future__ import annotations

import json

from meshwright.cli import build_parser
from meshwright.commands import plan as plan_cmd

LAYOUTS = [("1 rank", 1, []), ("dp2 (DDP)", 2, ["--dp", "2", "--zero", "0"]),
           ("dp2 ZeRO-2", 2, ["--dp", "2", "--zero", "2"]), ("tp2+sp", 2, ["--tp", "2", "--sp"]),
           ("tp2", 2, ["--tp", "2", "--no-sp"]), ("pp2 1f1b", 2, ["--pp", "2", "--schedule", "1f1b"]),
           ("dp4 (DDP)", 4, ["--dp", "4", "--zero", "0"]),
           ("tp2 x dp2", 4, ["--tp", "2", "--dp", "2", "--pp", "1", "--zero", "0", "--no-sp"]),
           ("dp2 ZeRO-3 x pp2", 4, ["--pp", "2", "--dp", "2", "--zero", "3", "--schedule", "1f1b"]),
           ("pp2 x dp2", 4, ["--pp", "2", "--dp", "2", "--schedule", "1f1b", "--zero", "0"]),
           ("free search, 2 ranks", 2, []), ("free search, 4 ranks", 4, [])]


def main() -> None:
    for name, world, extra in LAYOUTS:
        argv = ["plan", "--model", "tiny", "--cluster", "local-cpu", "--devices-per-node", str(world), "--seq-len",
                "128", "--global-batch", "16", *(["--micro-batch", "4"] if extra else []), *extra]
        r = plan_cmd.compute_result(build_parser().parse_args(argv))
        print(json.dumps([name, r["layout"], r["predicted"]["step_s"], r["predicted"]["memory_gib_max"]]))


if __name__ == "__main__":
    main()
