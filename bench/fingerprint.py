#!/usr/bin/env python
"""A behaviour fingerprint: short runs of both training scripts, the sha256 of every weight file they write and the
demo model's metrics. Run it before and after a refactor: the two outputs must be identical.

    python bench/fingerprint.py before.json      # ... refactor ...
    python bench/fingerprint.py after.json && diff before.json after.json

The demo recipe trains 30 steps (a checkpoint at 15, then a resume to 30, so checkpointing is covered) and is
evaluated with theta and theta^g; the tiny Stable Diffusion of `capman_peft.testing` trains 6 steps with cached latents,
CBDM and the partial general pass. CPU, one thread: bit-identical on the same machine and software.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def weight_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.safetensors"))
        if "checkpoint" not in str(p.relative_to(folder))
    }


def main() -> None:
    import torch

    torch.set_num_threads(1)
    import train_text_to_image_cm
    import train_unet_cm
    from capman_peft.evaluation import evaluate_pipeline
    from capman_peft.testing import build_tiny_sd, write_artbench_mirror

    tmp = Path(tempfile.mkdtemp(prefix="capman-fingerprint-"))
    demo = tmp / "demo"
    common = ["--config", str(ROOT / "configs/demo_digits.yaml"), "--output_dir", str(demo), "--report_to", "none"]
    train_unet_cm.main([*common, "--max_train_steps", "15", "--checkpointing_steps", "15"])
    train_unet_cm.main([*common, "--max_train_steps", "30", "--resume_from_checkpoint", "latest"])
    metrics = {}
    for expert in ("on", "off"):
        result = evaluate_pipeline(
            demo, num_images_per_class=10, steps=5, expert=expert, cache_dir=tmp / "cache", progress=False
        )
        metrics[expert] = {
            "overall": result["overall"],
            "splits": result["splits"],
            "classifier_accuracy": result["classifier_accuracy"],
        }

    base, data = build_tiny_sd(tmp / "sd"), write_artbench_mirror(tmp / "artbench")
    sd = tmp / "sd-out"
    train_text_to_image_cm.main(
        [
            "--pretrained_model_name_or_path", str(base), "--dataset", "imb-artbench10", "--dataset_name", str(data),
            "--imbalance_ratio", "4", "--resolution", "16", "--train_batch_size", "4", "--max_train_steps", "6",
            "--rank", "4", "--expert_rank", "2", "--objective", "cbdm", "--cache_latents", "--random_flip",
            "--cm_general_fraction", "0.5", "--validation_epochs", "0", "--num_inference_steps", "2",
            "--num_validation_images", "1", "--report_to", "none", "--output_dir", str(sd),
        ]
    )  # fmt: skip
    summary = json.loads((sd / "training_summary.json").read_text())
    Path(sys.argv[1]).write_text(
        json.dumps(
            {
                "demo_weights": weight_hashes(demo),
                "demo_metrics": metrics,
                "sd_weights": weight_hashes(sd),
                "sd_final_losses": summary["final_losses"],
            },
            indent=1,
            sort_keys=True,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
