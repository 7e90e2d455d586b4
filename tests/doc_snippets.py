"""Fixtures for the Python snippets of the README and docs pages, which the test suite runs (pytest-markdown-docs; a
pytest plugin, ``-p doc_snippets`` in pyproject.toml, so that the pages outside tests/ see them): a snippet names what
it needs in its fence, e.g. ``{ .python fixture:demo_output_cwd }``; ``notest`` marks one that needs the Hub."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def scratch_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A snippet "run from the repository root", in a scratch folder: the recipes are there, what it writes stays out
    of the checkout."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    return tmp_path


@pytest.fixture
def demo_output_cwd(scratch_cwd: Path) -> Path:
    """`scratch_cwd` holding a `demo_output/` as `make demo` writes it, trained for 2 steps instead of 2000."""
    import train_unet_cm

    fast = ["--max_train_steps", "2", "--num_inference_steps", "2", "--num_validation_images", "1"]
    train_unet_cm.main(["--config", "configs/demo_digits.yaml", *fast])
    return scratch_cwd


@pytest.fixture
def registry_restored():
    """The family table as it was before the snippet registered a family of its own."""
    from capman_peft.families import FAMILIES

    before = dict(FAMILIES)
    yield
    FAMILIES.clear()
    FAMILIES.update(before)
