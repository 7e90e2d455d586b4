"""The documentation: the README stays a front page, the docs site builds in strict mode (no dead link, no page left
out of the nav), and no text speaks of releases, issues or what something used to be (CHANGELOG.md does)."""

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from doc_snippets import RUN_ON_CPU, command_lines

ROOT = Path(__file__).resolve().parent.parent
# History phrases; a sentence broken over two lines is caught too (the text is searched with line breaks as spaces).
HISTORY = re.compile(
    r"\b(this|first|earlier|previous|last|next) release\b|\bissues? #?\d+|\bthe issue\b|\bused to (be|say|do|train)\b"
    r"|\bno longer\b|\bpreviously\b|\bformerly\b|\bthe then\b|\bsince this\b"
    r"|\b(the )?old (default|rule|form|version)s?\b"
    r"|\bwas the default\b|\bearlier (default|version|study|answer)\b|\bfirst version\b|\bnow (also|the default)\b",
    re.IGNORECASE,
)


def texts() -> list[Path]:
    """Every file a reader or maintainer reads as the project's present: README, docs, code, recipes, benchmarks."""
    patterns = ["README.md", "docs/*.md", "capman_peft/**/*.py", "*.py", "configs/*.yaml", "bench/*.py", "bench/*.yaml"]
    return [path for pattern in patterns for path in sorted(ROOT.glob(pattern))] + [ROOT / "Makefile", ROOT / "tests"]


def test_no_text_speaks_of_history():
    files = [f for path in texts() for f in (sorted(path.glob("*.py")) if path.is_dir() else [path])]
    found = [
        f"{path.relative_to(ROOT)}: {match.group(0)!r}"
        for path in files
        if path.name != "test_docs.py"
        for match in HISTORY.finditer(re.sub(r"\s*\n\s*(#\s*)?", " ", path.read_text()))
    ]
    assert not found, "history belongs in CHANGELOG.md:\n" + "\n".join(found)


def test_the_phrase_check_catches_history():
    assert HISTORY.search("measured after this release's changes") and HISTORY.search("the issue that asked")
    assert HISTORY.search(re.sub(r"\s*\n\s*", " ", "the first\nrelease's default"))
    assert not HISTORY.search("keep the old one until the new one is in place")


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / page).is_file(), f"README links to a missing {page}"


def test_docs_site_builds_in_strict_mode(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "study" / "index.html").is_file()


# Every documented command's flags are checked against its parser (its --help, run in this process), and the
# recipes, scripts and make targets it names must exist; the ones that fit a CPU also run (tests/doc_snippets.py).
HELP = {
    "train_unet_cm.py": ("path", "train_unet_cm.py"),
    "train_text_to_image_cm.py": ("path", "train_text_to_image_cm.py"),
    "train_classifier_cm.py": ("path", "train_classifier_cm.py"),
    "capman-eval": ("module", "capman_peft.evaluation"),
    "capman-analyze": ("module", "capman_peft.analysis"),
    "capman-downstream": ("module", "capman_peft.evaluation.downstream_cli"),
}
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_commands() -> list[tuple[str, list[str]]]:
    """(page, tokens) of every command line in a bash block of the README and docs."""
    return [
        (page.name, line.split())
        for page in PAGES
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.DOTALL)
        for line in command_lines(block)
    ]


def test_every_shell_block_runs_on_cpu_or_says_why_not():
    """A bash block is preceded by ``<!-- run on CPU: FLAGS -->`` (the suite runs it with those flags) or by
    ``<!-- not run: WHY -->``."""
    for page in PAGES:
        text = page.read_text()
        for block in re.finditer(r"```bash\n", text):
            before = text[: block.start()].rstrip()
            assert before.endswith("-->"), f"{page.name}:{text[: block.start()].count(chr(10)) + 1}: not marked"
            marker = before[before.rindex("<!--") :]
            assert re.match(r"<!-- (run on CPU: |not run: \S)", marker), f"{page.name}: {marker[:60]}"
    runs = [page for page in PAGES if RUN_ON_CPU.search(page.read_text())]
    assert len(runs) >= 2


def help_text(tokens: list[str], capsys, monkeypatch) -> str | None:
    """The --help of the command on this line (a subcommand's for capman-analyze); None for make, git and the like."""
    words = [t for t in tokens if t not in ("accelerate", "launch", "python")]
    kind, target = HELP.get(words[0], ("path", words[0]) if words[0].startswith("bench/") else (None, None))
    if kind is None:
        return None
    sub = [words[1]] if words[0] == "capman-analyze" else []
    monkeypatch.setattr(sys, "argv", [words[0], *sub, "--help"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        if kind == "path":
            runpy.run_path(str(ROOT / target), run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__")
    assert done.value.code in (0, None)
    return capsys.readouterr().out


def test_documented_commands_use_flags_their_parsers_have(capsys, monkeypatch):
    commands = documented_commands()
    assert len(commands) > 10
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    makefile = (ROOT / "Makefile").read_text()
    helps: dict[tuple[str, ...], str | None] = {}
    for page, tokens in commands:
        for token in tokens:
            if re.fullmatch(r"configs/[\w./-]+\.yaml|bench/\w+\.py", token):
                assert (ROOT / token).is_file(), f"{page}: {' '.join(tokens)} names a missing {token}"
        if tokens[0] == "make":
            assert re.search(rf"^{tokens[1]}:", makefile, re.MULTILINE), f"{page}: no make target {tokens[1]}"
        key = tuple(t for t in tokens[:4] if not t.startswith("-"))
        if key not in helps:
            helps[key] = help_text(tokens, capsys, monkeypatch)
        if helps[key] is None:
            continue
        for flag in {m for t in tokens for m in re.findall(r"(?<![\w-])--[a-z][\w-]*", t)}:
            assert re.search(rf"(?<![\w-]){flag}(?![\w-])", helps[key]), f"{page}: {' '.join(tokens)}: no {flag}"
