"""capman-peft: Capacity Manipulation for class-imbalanced diffusion models (diffusers + PEFT)."""
