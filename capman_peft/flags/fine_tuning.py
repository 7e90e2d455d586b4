"""The fine-tuning script's own flags (``train_text_to_image_cm.py``): the base pipeline, the adapter, text and
latents, the export, and the paper's ArtBench recipe as defaults; the flags both scripts share are in
``definitions.py``."""

from __future__ import annotations

import argparse
import importlib.util

from diffusers.utils.import_utils import is_xformers_available

from ..errors import ConfigError
from ..families.pretrained_output import BASE_LICENSE
from ..objective import CONSISTENCY
from ..objective.schedule import WEIGHTING_SCHEMES
from ..settings import ObjectiveSettings
from .definitions import script_parser
from .values import (
    fraction,
    module_patterns,
    nonnegative_float,
    positive_float,
    positive_int,
    probability,
    prompt_template_value,
)

# Fine-tuning, CM's default is on but not measured on quality: no testbed of the study fine-tunes. From scratch it is
# off, as in train_unet_cm.py: on the study's latent testbed CM made the model worse overall (docs/study.md, testbed 5).
LORA_CM_HELP = (
    "Train with the CM loss. Default: on when fine-tuning (a general LoRA and a reserved expert LoRA; the LoRA mode "
    "has no quality testbed yet, so neither this default nor --cm_form's is measured for it); off from scratch "
    "(--model_config_name_or_path), where the study's latent testbed measured CM worse than plain training "
    "overall (docs/study.md). --no_capacity_manipulation: one plain LoRA (from scratch: the whole UNet)."
)

BASE_MODEL = "lambdalabs/miniSD-diffusers"


def fine_tuning_parser(description: str | None) -> argparse.ArgumentParser:
    """The fine-tuning script's parser: the shared flags with its defaults, and its own groups."""
    parser = script_parser(
        description, dataset="imb-artbench10", resolution=None, objective="ddpm", validation_epochs=10,
        guidance_scale=None, capacity_manipulation=None, capacity_manipulation_help=LORA_CM_HELP,
    )  # fmt: skip
    add_model_args(parser)
    parser.cm_only.update({"expert_rank", "expert_alpha", "expert_target_modules"})  # the baseline is a plain LoRA
    add_text_args(parser)
    group = parser.add_argument_group("export")
    group.add_argument(
        "--push_merged_pipeline",
        action="store_true",
        help="With --push_to_hub, upload the whole merged pipeline folder instead of only the LoRA file and card.",
    )
    group.add_argument(
        "--license",
        default=None,
        help=f"License in the model card; default: the base model card's, else {BASE_LICENSE}.",
    )
    # theta^g on a quarter of each batch: the CM step costs ~1.25x plain LoRA instead of ~2x (docs/benchmarks.md),
    # with the same CM loss in expectation (importance-weighted rows).
    parser.set_defaults(
        learning_rate=3e-4,
        adam_weight_decay=1e-6,
        num_train_epochs=100,
        lr_warmup_steps=0,
        label_dropout=0.1,
        cm_general_fraction=0.25,
    )
    return parser


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--pretrained_model_name_or_path",
        default=BASE_MODEL,
        help="Stable Diffusion 1.x/2.x, SDXL, SD3/3.5 or Flux pipeline to fine-tune (Hub id or local folder; the "
        "family is read from its model_index.json); the paper uses miniSD (256 px).",
    )
    group.add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="A VAE to use instead of the base pipeline's (e.g. madebyollin/sdxl-vae-fp16-fix for fp16 SDXL training).",
    )
    group.add_argument("--revision", default=None, help="Revision of the base model on the Hub.")
    group.add_argument("--variant", default=None, help='Weight variant of the base model files, e.g. "fp16".')
    group.add_argument("--cache_dir", default=None, help="Where downloaded models and datasets are stored.")
    group.add_argument("--rank", type=positive_int, default=128, help="Rank of the general LoRA adapter (paper: 128).")
    group.add_argument("--expert_rank", type=positive_int, default=8, help="Rank of the reserved expert (paper: 8).")
    group.add_argument(
        "--lora_alpha", type=positive_float, default=None, help="General adapter alpha (default: --rank)."
    )
    group.add_argument(
        "--expert_alpha", type=positive_float, default=None, help="Expert alpha (default: --expert_rank)."
    )
    group.add_argument(
        "--lora_dropout", type=probability, default=0.1, help="Dropout on the adapter input (paper: 0.1)."
    )
    group.add_argument(
        "--target_modules",
        type=module_patterns,
        default=None,
        help="Denoiser layers that get the adapter: comma-separated names or name suffixes, or one regex. Default: "
        "the family's (SD 1.x/2.x, SDXL: the attention projections to_q,to_k,to_v,to_out.0; SD3, Flux: those of "
        "diffusers' SD3 / Flux LoRA scripts).",
    )
    group.add_argument(
        "--expert_target_modules",
        type=module_patterns,
        default=None,
        help="Layers that also get the expert (default: all targets; from scratch: the up path's).",
    )
    group.add_argument(
        "--model_config_name_or_path",
        default=None,
        help="Train the UNet from scratch instead of fine-tuning the base's: a UNet2DConditionModel config (a JSON "
        "file, or a folder or Hub id with config.json), randomly initialised (SD 1.x/2.x bases; their VAE, text "
        "encoder and scheduler stay, frozen). CM then runs in full mode (paper Eq. 1): the UNet's weights are "
        "theta^g and a reserved expert of rank --expert_rank_ratio sits in the up path; without CM the whole UNet "
        "trains. The LoRA flags (--rank, --lora_alpha, --lora_dropout, --target_modules, ...) do not apply.",
    )
    group.add_argument(
        "--expert_rank_ratio",
        type=fraction,
        default=0.1,
        help="From scratch (--model_config_name_or_path): expert rank / min(d, k) of each expert layer (paper: 0.1).",
    )
    group.add_argument(
        "--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention."
    )
    group.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (saves memory).")


def add_text_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("text and latents")
    group.add_argument(
        "--prompt_template",
        type=prompt_template_value,
        default=None,
        help='Class prompt; "{}" is the class name ("a" before it becomes "an" before a vowel). Default: the named '
        'dataset\'s ("a {} painting" for imb-artbench10, "a photo of a {}" for CIFAR), else "a {} painting".',
    )
    group.add_argument(
        "--caption_column",
        default=None,
        help="Per-image captions: the caption column of a --dataset_name or of a --train_data_dir metadata.jsonl. Each "
        "image trains on its own caption (a caption of several lines holds alternatives: one line is drawn per step); "
        "its class (--class_column) still decides the CM weights, the splits and the evaluation. Default: none (the "
        "class prompt for every image).",
    )
    group.add_argument(
        "--validation_prompts_per_class",
        default=None,
        help='A JSON file {"class name": "prompt", ...}: the class prompts of the validation grids, the expert-use '
        "report and capman-eval, instead of --prompt_template (useful with --caption_column).",
    )
    group.add_argument(
        "--caption_dropout",
        "--proportion_empty_prompts",
        dest="label_dropout",
        type=probability,
        default=argparse.SUPPRESS,
        help="Probability of training on the empty prompt instead (classifier-free guidance); same as "
        "--label_dropout. Default 0.1, as in Stable Diffusion's own training.",
    )
    group.add_argument(
        "--noise_offset", type=nonnegative_float, default=0.0, help="Noise offset (diffusers' flag; 0: off)."
    )
    group.add_argument(
        "--cache_latents",
        action="store_true",
        help="VAE-encode every training image once per flip state before training (implies a center crop: SDXL's "
        "time ids then carry the center's position).",
    )
    group.add_argument(
        "--max_sequence_length",
        type=positive_int,
        default=None,
        help="T5 tokens of a prompt (SD3, Flux; diffusers' LoRA scripts' flag). Default: the family's (SD3 77, Flux "
        "512, as those scripts).",
    )
    group.add_argument(
        "--drop_t5",
        action="store_true",
        help="SD3: train without the T5 text encoder (diffusers' text_encoder_3=None: its part of the prompt embedding "
        "is zeros), saving its memory; the output keeps the base's T5 folder, and capman-eval loads it without T5.",
    )
    add_flow_args(parser)


def add_flow_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("flow matching (SD3, Flux): the flags of diffusers' SD3 and Flux LoRA scripts")
    group.add_argument(
        "--weighting_scheme",
        choices=WEIGHTING_SCHEMES,
        default=None,
        help="How sigma is drawn and the loss weighted (compute_density_for_timestep_sampling, "
        "compute_loss_weighting_for_sd3). Default: the family's, as diffusers' scripts (SD3 logit_normal, Flux none). "
        "Flow-matching bases only.",
    )
    group.add_argument("--logit_mean", type=float, default=0.0, help="Mean of logit_normal's normal.")
    group.add_argument("--logit_std", type=float, default=1.0, help="Std of logit_normal's normal.")
    group.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the mode scheme.")


# The flags of the LoRA adapter, which a UNet trained from scratch does not have.
LORA_FLAGS = ("rank", "expert_rank", "lora_alpha", "expert_alpha", "lora_dropout", "target_modules")


def check_adapter_flags(
    parser: argparse.ArgumentParser, args: argparse.Namespace, objective: ObjectiveSettings
) -> None:
    """The adapter and optional-package flags, checked before the base model is read."""
    cm = objective.capacity_manipulation
    if args.model_config_name_or_path:
        given = [flag for flag in LORA_FLAGS if getattr(args, flag) != parser.script_default(flag)]
        if given:
            raise ConfigError(
                f"--{given[0]} {getattr(args, given[0])}: sets the LoRA adapter, and --model_config_name_or_path "
                "trains the whole UNet from scratch (CM's expert: --expert_rank_ratio, --expert_target_modules); "
                "allowed: leave it unset"
            )
    elif args.expert_rank_ratio != parser.script_default("expert_rank_ratio"):
        raise ConfigError(
            f"--expert_rank_ratio {args.expert_rank_ratio}: sizes the expert of a UNet trained from scratch; the "
            "fine-tuned one's is --expert_rank; allowed: --expert_rank_ratio with --model_config_name_or_path"
        )
    if objective.objective == CONSISTENCY:
        raise ConfigError(
            "--objective consistency: trains a UNet2DModel from scratch (train_unet_cm.py); "
            "allowed here: ddpm, cbdm, oc"
        )
    if args.resolution is not None and args.resolution % 8:
        raise ConfigError(
            f"--resolution {args.resolution}: the VAE downsamples by 8; allowed: a positive multiple of 8"
        )
    if cm and not args.expert_rank < args.rank:
        raise ConfigError(
            f"--expert_rank {args.expert_rank}: not below --rank {args.rank}; allowed: 1 .. rank - 1 (paper: r_e < r_g)"
        )
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "--use_8bit_adam: needs bitsandbytes, which is not installed; allowed: pip install bitsandbytes"
        )
    if args.enable_xformers_memory_efficient_attention and not is_xformers_available():
        raise ConfigError(
            "--enable_xformers_memory_efficient_attention: needs xformers, which is not installed; allowed: pip "
            "install xformers"
        )
