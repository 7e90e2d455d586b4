"""ClassConditionalPipeline: saving, loading (with and without capman_peft), sampling, guidance math."""

import functools
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_python_without_capman
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from PIL import Image

from capman_peft import ClassConditionalPipeline, save_class_conditional_pipeline
from capman_peft.testing import make_tiny_unet2d

CLASS_NAMES = ["cat", "dog", "bird"]
SIZE = 8


def make_unet(num_classes: int | None = len(CLASS_NAMES)) -> UNet2DModel:
    return make_tiny_unet2d(num_classes).eval()


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipe") / "out"
    save_class_conditional_pipeline(make_unet(), DDPMScheduler(), CLASS_NAMES, out)
    return out


@pytest.fixture
def pipe(saved_dir) -> ClassConditionalPipeline:
    pipeline = ClassConditionalPipeline.from_pretrained(saved_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def use_scheduler(pipeline: ClassConditionalPipeline, name: str) -> None:
    if name == "ddim":
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    else:
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(
            pipeline.scheduler.config, algorithm_type="dpmsolver++"
        )


def test_class_names_round_trip_as_id2label_dict(saved_dir, pipe):
    model_index = json.loads((saved_dir / "model_index.json").read_text())
    assert model_index["_class_name"] == "ClassConditionalPipeline"
    assert model_index["id2label"] == {"0": "cat", "1": "dog", "2": "bird"}
    assert pipe.class_names == CLASS_NAMES
    assert (pipe.num_classes, pipe.null_class_id) == (3, 3)


def test_saved_folder_holds_only_safetensors_weights(saved_dir):
    files = sorted(p.relative_to(saved_dir).as_posix() for p in saved_dir.rglob("*") if p.is_file())
    assert files == [
        "model_index.json",
        "pipeline.py",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++"])
@pytest.mark.parametrize("guidance_scale", [1.0, 1.5])
def test_sampling_is_deterministic_per_seed_and_accepts_names(pipe, scheduler, guidance_scale):
    use_scheduler(pipe, scheduler)

    def sample(labels, seed=0):
        return pipe(
            labels,
            num_inference_steps=4,
            guidance_scale=guidance_scale,
            generator=seeded(seed),
            output_type="np",
        ).images

    images = sample([0, "bird"])
    assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.float32
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(images, sample([0, "bird"]))
    np.testing.assert_array_equal(images, sample(["cat", 2]))
    assert not np.array_equal(images, sample([0, "bird"], seed=1))


def test_output_types_pil_np_pt(pipe):
    use_scheduler(pipe, "ddim")
    outputs = {
        kind: pipe([1, 2], num_inference_steps=2, generator=seeded(), output_type=kind).images
        for kind in ("pil", "np", "pt")
    }
    assert len(outputs["pil"]) == 2
    assert all(isinstance(im, Image.Image) and im.size == (SIZE, SIZE) and im.mode == "RGB" for im in outputs["pil"])
    pt = outputs["pt"]
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 3, SIZE, SIZE)
    assert pt.min() >= 0 and pt.max() <= 1
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), outputs["np"], atol=1e-6)
    pil_as_np = np.stack([np.asarray(im) for im in outputs["pil"]])
    np.testing.assert_array_equal(pil_as_np, (outputs["np"] * 255).round().astype(np.uint8))


def test_eta_reaches_ddim_only(pipe):
    use_scheduler(pipe, "ddim")
    deterministic = pipe([0], num_inference_steps=3, generator=seeded(), output_type="np", eta=0.0).images
    stochastic = pipe([0], num_inference_steps=3, generator=seeded(), output_type="np", eta=1.0).images
    assert not np.array_equal(deterministic, stochastic)
    use_scheduler(pipe, "dpmsolver++")  # its step has no eta: the argument must not be passed
    pipe([0], num_inference_steps=3, generator=seeded(), output_type="np", eta=1.0)


@pytest.mark.parametrize("guidance_scale", [1.0, 1.5, 3.0])
def test_guided_noise_is_uncond_plus_w_times_difference(pipe, guidance_scale):
    use_scheduler(pipe, "ddim")
    captured, unet_batch_sizes = [], []
    original_step = pipe.scheduler.step

    @functools.wraps(original_step)  # keeps the signature the pipeline inspects for eta/generator
    def recording_step(model_output, timestep, sample, **kwargs):
        captured.append((model_output.clone(), timestep, sample.clone()))
        return original_step(model_output, timestep, sample, **kwargs)

    pipe.scheduler.step = recording_step
    hook = pipe.unet.register_forward_hook(lambda module, args, output: unet_batch_sizes.append(len(args[0])))
    labels = [2, 0]
    pipe(labels, num_inference_steps=3, guidance_scale=guidance_scale, generator=seeded(), output_type="np")
    hook.remove()

    # One UNet call per step: cond and null-class rows batched together when guidance is on.
    assert unet_batch_sizes == [4 if guidance_scale != 1.0 else 2] * 3
    with torch.no_grad():  # DDIM's scale_model_input is the identity, so the UNet sees x_t itself
        for model_output, t, x_t in captured:
            eps_cond = pipe.unet(x_t, t, class_labels=torch.tensor(labels)).sample
            eps_uncond = pipe.unet(x_t, t, class_labels=torch.tensor([3, 3])).sample
            assert not torch.allclose(eps_cond, eps_uncond)
            expected = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            torch.testing.assert_close(model_output, expected, rtol=1e-5, atol=1e-5)


def test_unknown_class_name_lists_known_names(pipe):
    with pytest.raises(ValueError, match=r"Unknown class name 'fish'.*\['cat', 'dog', 'bird'\]"):
        pipe(["cat", "fish"], num_inference_steps=1)


@pytest.mark.parametrize("bad_id", [3, -1, 10])
def test_out_of_range_class_id_lists_valid_ids(pipe, bad_id):
    with pytest.raises(ValueError, match=rf"Class id {bad_id} is outside \[0, 3\).*0\.\.2"):
        pipe([bad_id], num_inference_steps=1)


def test_init_rejects_unet_without_null_class_and_wrong_class_names():
    with pytest.raises(ValueError, match="num_class_embeds"):
        ClassConditionalPipeline(make_unet(None), DDPMScheduler())
    with pytest.raises(ValueError, match=r"0\.\.2"):
        ClassConditionalPipeline(make_unet(), DDPMScheduler(), id2label={0: "cat", 1: "dog"})


def test_names_are_optional_then_only_ids_work(tmp_path):
    save_class_conditional_pipeline(make_unet(), DDPMScheduler(), None, tmp_path)
    pipeline = ClassConditionalPipeline.from_pretrained(tmp_path)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.class_names is None
    assert pipeline([2], num_inference_steps=1, output_type="pt").images.shape == (1, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="known class names: None"):
        pipeline(["cat"], num_inference_steps=1)


# Runs in a fresh interpreter in which any import of capman_peft fails, as for a user who only
# has diffusers; it also re-saves the loaded pipeline to check that pipeline.py travels along.
STANDALONE_LOAD = textwrap.dedent(
    """
    import torch
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    out, resaved = sys.argv[1], sys.argv[2]
    pipe = DiffusionPipeline.from_pretrained(out, custom_pipeline="pipeline", trust_remote_code=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["bird", 0], num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 3), images.shape
    assert pipe.class_names == ["cat", "dog", "bird"], pipe.class_names
    pipe.save_pretrained(resaved)
    assert not any(name.split(".")[0] == "capman_peft" for name in sys.modules)
    print(type(pipe).__module__, type(pipe).__name__)
    """
)


@pytest.mark.slow
def test_custom_pipeline_loads_and_samples_without_capman_peft(saved_dir, tmp_path):
    resaved = tmp_path / "resaved"
    result = run_python_without_capman(STANDALONE_LOAD, [saved_dir, resaved], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["diffusers_modules.local.pipeline", "ClassConditionalPipeline"]
    assert (resaved / "pipeline.py").read_bytes() == (saved_dir / "pipeline.py").read_bytes()
