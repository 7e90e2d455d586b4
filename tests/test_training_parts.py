"""The training library's parts in isolation: step and epoch arithmetic, recipes vs the command line, the checkpoint
round trip, and per-step draws that do not depend on how a step is split into micro-batches."""

from __future__ import annotations

import argparse
import itertools
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from torch.utils.data import DataLoader, RandomSampler

from capman_peft.checkpointing import load_checkpoint, save_checkpoint
from capman_peft.flags import ArgumentParser, positive_int
from capman_peft.objective import build_objective
from capman_peft.randomness import StepRandomness
from capman_peft.recipes import load_recipe, recipe_defaults
from capman_peft.training.loop import steps_per_epoch, train_batches, validation_due
from capman_peft.training.setup import total_steps

# --- steps and epochs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("batches, accumulation, expected", [(10, 1, 10), (10, 3, 4), (9, 3, 3), (1, 4, 1), (0, 2, 1)])
def test_steps_per_epoch_counts_the_last_short_accumulation(batches, accumulation, expected):
    assert steps_per_epoch(batches, accumulation) == expected


def test_total_steps_from_steps_or_epochs():
    by_epochs = SimpleNamespace(max_train_steps=None, num_train_epochs=3, gradient_accumulation_steps=3)
    assert total_steps(by_epochs, 10) == 3 * 4
    by_steps = SimpleNamespace(max_train_steps=7, num_train_epochs=3, gradient_accumulation_steps=3)
    assert total_steps(by_steps, 10) == 7


def test_validation_is_due_at_the_end_of_every_nth_epoch():
    assert [s for s in range(1, 31) if validation_due(2, s, per_epoch=5)] == [10, 20, 30]
    assert [s for s in range(1, 31) if validation_due(1, s, per_epoch=7)] == [7, 14, 21, 28]
    assert not any(validation_due(0, s, per_epoch=5) for s in range(1, 50))


def fake_accelerator(accumulation: int = 1, process: int = 0, processes: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        gradient_accumulation_steps=accumulation,
        skip_first_batches=lambda loader, n: itertools.islice(loader, n, None),
        process_index=process,
        num_processes=processes,
        device=torch.device("cpu"),
    )


def test_a_resumed_run_sees_the_batches_an_uninterrupted_run_would():
    """Data order depends only on (seed, epoch): starting at step 7 of 5-step epochs gives epoch 1 from its third
    batch on, the same batches as steps 8, 9, ... of a run from step 0."""
    order = torch.Generator()
    loader = DataLoader(list(range(10)), batch_size=2, sampler=RandomSampler(range(10), generator=order))

    def first(start: int, n: int) -> list[tuple[int, int, list[int]]]:
        batches = train_batches(fake_accelerator(), loader, order, seed=3, global_step=start)
        return [(epoch, micro, batch.tolist()) for epoch, micro, batch in itertools.islice(batches, n)]

    straight = first(0, 15)
    resumed = first(7, 8)
    assert resumed == straight[7:15]
    assert resumed[0][:2] == (1, 2) and straight[5][0] == 1  # epoch 1, third batch
    assert sorted(sum((b for _, _, b in straight[:5]), [])) == list(range(10))  # an epoch sees every item once
    assert [b for _, _, b in straight[:5]] != [b for _, _, b in straight[5:10]]  # reshuffled per epoch


# --- recipes vs the command line -----------------------------------------------------------------------------


def tiny_parser() -> ArgumentParser:
    parser = ArgumentParser()
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--name", default="plain")
    parser.add_argument("--flag", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--config", default=None)
    return parser


def test_the_command_line_beats_the_recipe_which_beats_its_base_which_beats_the_defaults(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 3\nname: base\nflag: true\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nname: child\n")
    parser = tiny_parser()
    parser.set_defaults(**recipe_defaults(parser, load_recipe(tmp_path / "child.yaml")))
    assert vars(parser.parse_args([])) == {"steps": 3, "name": "child", "flag": True, "config": None}
    assert parser.parse_args(["--steps", "5", "--no-flag"]).steps == 5
    assert parser.parse_args(["--no-flag"]).flag is False
    assert tiny_parser().parse_args([]).steps == 10


# --- checkpoints -----------------------------------------------------------------------------------------------


def test_a_checkpoint_round_trip_restores_weights_and_nested_state(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "counters": {"epoch": 2, "names": ["a", "b"]}}
    path = save_checkpoint(tmp_path, 5, model, state)
    assert path.name == "checkpoint-5" and sorted(p.name for p in path.iterdir()) == [
        "model.safetensors",
        "state.json",
        "state.safetensors",
    ]
    fresh = torch.nn.Linear(3, 2)
    loaded = load_checkpoint(path, fresh)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    assert loaded["step"] == 5 and loaded["counters"] == {"epoch": 2, "names": ["a", "b"]}
    restored = torch.optim.Adam(fresh.parameters(), lr=0.1)
    restored.load_state_dict(loaded["optimizer"])
    original, back = optimizer.state_dict()["state"], restored.state_dict()["state"]
    assert original.keys() == back.keys() == {0, 1}
    for key in original:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(original[key][name], back[key][name])


# --- per-step draws ----------------------------------------------------------------------------------------------


def test_a_step_draws_the_same_choices_whether_it_is_one_batch_or_accumulated_micro_batches():
    """Sample j of optimizer step s gets the same noise, timestep, label dropout, CBDM label and general-pass draw
    for 1 x 4, 2 x 2 accumulated and 2 processes x 2, and 2 processes x 2 x 2 accumulated: the draws are made per
    step, and the step's k-th batch as the data loader deals them (micro-batch m of process p: k = m*P + p) takes
    rows k*B:(k+1)*B."""
    objective = build_objective("cbdm", DDPMScheduler(), class_counts=[5, 3, 1])
    options = dict(label_dropout=0.3, objective=objective, general_draw=True)
    whole = StepRandomness(fake_accelerator(1), 7, 4, (3, 2, 2), **options)
    split = StepRandomness(fake_accelerator(2), 7, 2, (3, 2, 2), **options)
    for step in (0, 5):
        one = whole.micro_batch(step, micro=0)
        halves = [split.micro_batch(step, micro=m) for m in (0, 1)]
        for field in ("noise", "timesteps", "label_dropped", "extra_labels", "general_draw"):
            joined = torch.cat([getattr(h, field) for h in halves])
            assert torch.equal(getattr(one, field), joined), field
    assert not torch.equal(whole.micro_batch(0, 0).noise, whole.micro_batch(1, 0).noise)
    processes = [StepRandomness(fake_accelerator(1, p, 2), 7, 2, (3, 2, 2), **options) for p in (0, 1)]
    both = [StepRandomness(fake_accelerator(2, p, 2), 7, 1, (3, 2, 2), **options) for p in (0, 1)]
    for step in (0, 5):
        one = whole.micro_batch(step, micro=0)
        by_process = torch.cat([r.micro_batch(step, micro=0).noise for r in processes])
        assert torch.equal(one.noise, by_process)
        dealt = [both[p].micro_batch(step, micro=m).timesteps for m in (0, 1) for p in (0, 1)]  # k = m*2 + p
        assert torch.equal(one.timesteps, torch.cat(dealt))
