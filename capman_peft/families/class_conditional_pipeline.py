"""Class-conditional sampling pipeline for a diffusers `UNet2DModel` with a null class (CFG).

This file imports only torch and diffusers, never capman_peft: it is copied verbatim as
`pipeline.py` into every saved pipeline folder, so that diffusers' custom-pipeline mechanism
can load the folder where capman_peft is not installed.
"""

import inspect
import operator
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

CUSTOM_PIPELINE_FILENAME = "pipeline.py"


def write_custom_pipeline_file(output_dir: str | Path) -> Path:
    """Copy this module to `output_dir/pipeline.py`, the file diffusers' custom-pipeline loader reads."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / CUSTOM_PIPELINE_FILENAME
    shutil.copyfile(Path(__file__), target)
    return target


class ClassConditionalPipeline(DiffusionPipeline):
    """Sample images of given classes from a class-conditional `UNet2DModel`.

    The UNet has `num_class_embeds = C + 1`: ids 0..C-1 are the classes and id C is the null
    class the model was trained with under label dropout, used for classifier-free guidance.

    Args:
        unet: a `UNet2DModel` with `num_class_embeds` set.
        scheduler: any diffusers scheduler (DDPM, DDIM, DPMSolverMultistep, ...).
        id2label: class id -> class name for the C real classes. Stored as a dict with string
            keys (the `DiTPipeline` / transformers convention) and not as a list: diffusers reads
            every list-valued entry of `model_index.json` as a `[library, class]` component spec
            when loading from the Hub and rejects a list of class names there.
        unet_medium, unet_few, class_groups: a model with one UNet per class group (the Group-Expert
            LoRA baseline): class c is sampled by the UNet of group `class_groups[c]` (0: `unet`, 1:
            `unet_medium`, 2: `unet_few`), with its guidance pass too; each image runs through one UNet.
    """

    model_cpu_offload_seq = "unet"
    _optional_components = ["unet_medium", "unet_few"]

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: SchedulerMixin,
        id2label: dict[str, str] | dict[int, str] | None = None,
        unet_medium: UNet2DModel | None = None,
        unet_few: UNet2DModel | None = None,
        class_groups: dict[str, int] | dict[int, int] | None = None,
    ):
        super().__init__()
        num_class_embeds = unet.config.num_class_embeds
        if num_class_embeds is None or num_class_embeds < 2:
            raise ValueError(
                f"unet.config.num_class_embeds must be C + 1 >= 2 (C classes and a null class), got {num_class_embeds}."
            )
        if id2label is not None:
            id2label = {str(key): str(name) for key, name in id2label.items()}
            expected = {str(i) for i in range(num_class_embeds - 1)}
            if set(id2label) != expected:
                raise ValueError(
                    f"id2label must name exactly the class ids 0..{num_class_embeds - 2} of a UNet with "
                    f"num_class_embeds={num_class_embeds}; got keys {sorted(id2label, key=int)}."
                )
        if class_groups is not None:
            class_groups = {str(key): int(group) for key, group in class_groups.items()}
            unets = [unet, unet_medium, unet_few]
            missing = sorted({g for g in class_groups.values() if not 0 <= g < 3 or unets[g] is None})
            if set(class_groups) != {str(i) for i in range(num_class_embeds - 1)} or missing:
                raise ValueError(
                    "class_groups must give every class id 0..C-1 a group whose UNet is present (0: unet, 1: "
                    f"unet_medium, 2: unet_few); got {len(class_groups)} classes, groups without a UNet: {missing}."
                )
        self.register_modules(unet=unet, scheduler=scheduler, unet_medium=unet_medium, unet_few=unet_few)
        self.register_to_config(id2label=id2label, class_groups=class_groups)

    @property
    def num_classes(self) -> int:
        """C, the number of real classes (the null class is not counted)."""
        return self.unet.config.num_class_embeds - 1

    @property
    def null_class_id(self) -> int:
        """The class id the UNet was trained on for dropped labels: the unconditional branch of CFG."""
        return self.unet.config.num_class_embeds - 1

    @property
    def class_names(self) -> list[str] | None:
        """Class names ordered by id, or None when the pipeline was saved without them."""
        id2label = self.config.id2label
        if id2label is None:
            return None
        return [id2label[str(i)] for i in range(self.num_classes)]

    def get_label_ids(self, class_labels: int | str | Sequence[int | str]) -> list[int]:
        """Map class ids or class names to ids, raising ValueError (with the allowed values) on bad input."""
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels]
        names = self.class_names
        name_to_id = {name: i for i, name in enumerate(names or [])}
        ids = []
        for label in class_labels:
            if isinstance(label, str):
                if label not in name_to_id:
                    raise ValueError(f"Unknown class name {label!r}; known class names: {names}.")
                ids.append(name_to_id[label])
                continue
            try:
                class_id = operator.index(label)
            except TypeError:
                raise ValueError(f"Class labels must be ints or class names, got {label!r}.") from None
            if not 0 <= class_id < self.num_classes:
                raise ValueError(
                    f"Class id {class_id} is outside [0, {self.num_classes}): valid ids are "
                    f"0..{self.num_classes - 1} (id {self.null_class_id} is the null class)"
                    + (f", named {names}." if names else ".")
                )
            ids.append(class_id)
        return ids

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs) -> None:
        """Save as usual and add `pipeline.py`, so every saved copy stays loadable without capman_peft."""
        # Written first so that `push_to_hub=True` (which uploads inside the parent call) includes it.
        write_custom_pipeline_file(save_directory)
        super().save_pretrained(save_directory, *args, **kwargs)

    def _scheduler_step_kwargs(self, generator: torch.Generator | list[torch.Generator] | None, eta: float):
        # eta exists only for DDIM-like schedulers and generator only for stochastic ones.
        parameters = inspect.signature(self.scheduler.step).parameters
        kwargs = {}
        if "eta" in parameters:
            kwargs["eta"] = eta
        if "generator" in parameters:
            kwargs["generator"] = generator
        return kwargs

    def _group_rows(self, labels: list[int], use_guidance: bool, device: torch.device) -> list | None:
        """(UNet, row indices) for each class group with rows: a row and its guidance row go to the UNet of the
        requested class's group. None without class groups. Found once per call, not per denoising step."""
        if self.config.class_groups is None:
            return None
        groups = torch.tensor([self.config.class_groups[str(c)] for c in labels])
        groups = torch.cat([groups, groups]) if use_guidance else groups
        unets = [self.unet, self.unet_medium, self.unet_few]
        rows = [(unets[g], (groups == g).nonzero().flatten().to(device)) for g in range(len(unets))]
        return [(unet, index) for unet, index in rows if len(index)]

    def _predict(
        self, sample: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, group_rows: list | None
    ) -> torch.Tensor:
        """The UNet's prediction; with class groups, each group's rows from that group's UNet."""
        if group_rows is None:
            return self.unet(sample, t, class_labels=labels).sample
        out = None
        for unet, rows in group_rows:
            pred = unet(sample[rows], t, class_labels=labels[rows]).sample
            out = torch.empty_like(sample, dtype=pred.dtype) if out is None else out
            out[rows] = pred
        return out

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str],
        num_inference_steps: int = 50,
        guidance_scale: float = 1.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        eta: float = 0.0,
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per entry of `class_labels`.

        Args:
            class_labels: class ids in [0, C) or class names, one per image.
            guidance_scale: w in eps = eps_uncond + w * (eps_cond - eps_uncond) (diffusers' and DiT's convention;
                the CBDM and OC codes write eps_cond + w' * (eps_cond - eps_uncond), so their w' is w - 1).
                w = 1 is plain conditional sampling and skips the unconditional pass; any other w runs
                the conditional and null-class passes as one batch of 2B.
            generator: torch generator(s) for the initial noise and stochastic scheduler steps.
            output_type: "pil" (list of PIL images), "np" (B, H, W, 3) float array or "pt"
                (B, 3, H, W) float tensor, all in [0, 1].
            eta: DDIM eta; passed only to schedulers whose `step` accepts it.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
        device = self._execution_device
        labels = torch.tensor(self.get_label_ids(class_labels), device=device, dtype=torch.long)
        batch_size = len(labels)
        use_guidance = guidance_scale != 1.0
        if use_guidance:
            labels = torch.cat([labels, torch.full_like(labels, self.null_class_id)])

        sample_size = self.unet.config.sample_size
        if isinstance(sample_size, int):
            sample_size = (sample_size, sample_size)
        shape = (batch_size, self.unet.config.in_channels, *sample_size)
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        image = image * self.scheduler.init_noise_sigma

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        step_kwargs = self._scheduler_step_kwargs(generator, eta)
        group_rows = self._group_rows(labels[:batch_size].tolist(), use_guidance, device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([image, image]) if use_guidance else image
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self._predict(model_input, t, labels, group_rows)
            if use_guidance:
                noise_cond, noise_uncond = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            image = self.scheduler.step(noise_pred, t, image, **step_kwargs).prev_sample

        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            # float32 first: numpy has no bfloat16.
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
