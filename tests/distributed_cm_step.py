"""One CM training step with Accelerate; run plainly (1 process) or under torchrun (2 processes, gloo).

DDP averages gradients over processes, so two processes on halves of a batch must take the same step as one process
on the whole batch (ddpm base, dropout 0). Used by test_denoiser.py.
"""

import sys

import torch
from accelerate import Accelerator
from conftest import UP_TARGETS
from diffusers import DDPMScheduler
from peft import get_peft_model
from safetensors.torch import save_file

from capman_peft import CapManConfig, build_objective, cm_loss, cm_weights
from capman_peft.denoiser import CMDenoiser
from capman_peft.testing import make_tiny_unet2d


def main(out_path: str) -> None:
    accelerator = Accelerator(cpu=True)
    cfg = CapManConfig(mode="full", expert_rank_ratio=0.5, init_lora_weights=False, target_modules=UP_TARGETS)
    model = get_peft_model(make_tiny_unet2d(seed=0), cfg)
    counts = [40, 10, 2]
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    objective = build_objective("ddpm", scheduler=scheduler, class_counts=counts)
    weights = cm_weights(counts)
    denoiser = CMDenoiser(model, forward_mode="fused")
    optimizer = torch.optim.SGD(denoiser.parameters(), lr=0.5)
    if accelerator.is_main_process and accelerator.num_processes == 1:
        save_file(
            {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
            out_path.replace(".safetensors", ".init.safetensors"),
        )
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=gen)
    noise = torch.randn(4, 3, 8, 8, generator=gen)
    t = torch.tensor([10, 300, 600, 999])
    y = torch.tensor([0, 1, 2, 0])
    part = slice(
        accelerator.process_index * 4 // accelerator.num_processes,
        (accelerator.process_index + 1) * 4 // accelerator.num_processes,
    )
    x0, noise, t, y = x0[part], noise[part], t[part], y[part]
    x_t = scheduler.add_noise(x0, noise, t)

    out = denoiser(x_t, t, y)
    base, _ = objective(out.full, x0=x0, noise=noise, x_t=x_t, timesteps=t, labels=y)
    cm, _ = cm_loss(out.full, out.general, y, weights)
    accelerator.backward(base + cm)
    optimizer.step()
    if accelerator.is_main_process:
        state = accelerator.unwrap_model(denoiser).unet.state_dict()
        save_file({k: v.detach().contiguous() for k, v in state.items()}, out_path)
    accelerator.end_training()  # tear the gloo group down cleanly; a dangling group aborts at exit


if __name__ == "__main__":
    main(sys.argv[1])
