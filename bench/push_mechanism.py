#!/usr/bin/env python
"""Where the CM push sends its gradient while it is active, per form: a short run on the study testbed (DDPM base,
no EMA, a pilot seed that the study never uses), then ``capman-analyze push`` on its weights.

    python bench/push_mechanism.py                      # 150 steps per form, seed 100
    python bench/push_mechanism.py --steps 500 --seed 101

Printed per form: the rows of pushed classes still inside the margin, the norm of the push gradient's θ route (on the
general weights W^g and on the expert E; what the chain rule gives — only "hinge" applies it) and θ^g route (on W^g;
never on E), the norm on W^g of what the form applies, and the first-order change of θ's held-out loss per unit step
along the applied push, per split (> 0: the push makes θ worse there).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TESTBED = ROOT / "bench" / "testbed_digits_ir100.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="Training steps per form (the push is active early).")
    parser.add_argument("--seed", type=int, default=100, help="A pilot seed, not one of the study's 0-4.")
    parser.add_argument("--output_dir", default="bench_output/push_mechanism", help="Where the runs go.")
    args = parser.parse_args()

    import train_unet_cm
    from capman_peft.analysis import push_gradient
    from capman_peft.objective import LOWER_MARGIN_FORMS

    out = Path(args.output_dir)
    rows = []
    for form in LOWER_MARGIN_FORMS:
        run = out / form
        flags = ["--config", str(TESTBED), "--max_train_steps", str(args.steps), "--seed", str(args.seed)]
        flags += ["--objective", "ddpm", "--cm_form", form, "--no_use_ema", "--report_to", "none"]
        train_unet_cm.main([*flags, "--output_dir", str(run), "--overwrite_output_dir"])
        result = push_gradient(run, images_per_class=32, timesteps=10, seed=0, output_dir=run / "analysis")
        rows.append((form, result))

    print(
        f"\nDigits IR 100 testbed, DDPM base, {args.steps} steps, seed {args.seed}, no EMA; push gradient at the end.\n"
    )
    print(
        "| form | active pushed rows | θ route: W^g | θ route: E | θ^g route: W^g | applied on W^g | θ's held-out "
        "loss change per unit step along the applied push: Many / Medium / Few |"
    )
    print("|---|---|---|---|---|---|---|")
    for form, result in rows:
        norms = ("theta_general_weights", "theta_expert", "theta_g_general_weights", "push_general_weights")
        cells = " | ".join(f"{result[f'norm_{k}' if k.startswith('push') else f'norm_through_{k}']:.3g}" for k in norms)
        rates = " / ".join(f"{result['splits'][s]['push']:+.3g}" for s in ("many", "medium", "few"))
        print(f"| {form} | {result['active_rows']} | {cells} | {rates} |")
    (out / "summary.json").write_text(json.dumps([{"form": f, **r} for f, r in rows], indent=1))


if __name__ == "__main__":
    main()
