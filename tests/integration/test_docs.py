# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The docs stay true: every command block of the README, CONTRIBUTING.md and docs/ is either run here (offline,
on the tiny random model or the toy world's base model, with Hub ids swapped for a local folder and step counts
cut to a few) or marked `<!-- not run: REASON -->` on the line before it, and then every `attndb` command in it
still parses with the real argument parser. Python blocks compile and their `attndb_peft` imports resolve."""

from __future__ import annotations

import ast
import importlib
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from attndb_peft.cli import build_parser, main
from attndb_peft.testing import (
    make_instance_images,
    save_tiny_pipeline,
    save_tiny_sdxl_pipeline,
    save_tiny_single_file,
)

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "console", "shell"}
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")
ELLIPSIS = {"...", "…"}


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    not_run: str | None  # the reason given in the marker, or None when the block is run

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, each with the `not run` marker of the line before it."""
    found, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(```+)\s*([\w+-]*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, ticks, lang = i, fence.group(1), fence.group(2).lower()
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != ticks:
            body.append(lines[i])
            i += 1
        i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.search(before)
        found.append(Block(path, start + 1, lang, "\n".join(body), marker.group(1) if marker else None))
    return found


ALL_BLOCKS = [b for path in DOC_FILES for b in blocks(path)]
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang in SHELL]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang in {"python", "py"}]


def commands(block: Block) -> list[list[str]]:
    """The block's commands as argument lists: continuation lines joined, comments dropped, `&&` chains split."""
    text = re.sub(r"\\\n\s*", " ", block.text)
    out = []
    for line in text.splitlines():
        tokens = shlex.split(line, comments=True)
        current: list[str] = []
        for token in tokens:
            if token in {"&&", ";", "||"}:
                out.append(current)
                current = []
            else:
                current.append(token)
        out.append(current)
    return [c for c in out if c]


def attndb_argv(command: list[str]) -> list[str] | None:
    """The arguments `attndb` gets from a command line (`attndb ...`, `python -m attndb_peft ...`,
    `accelerate launch ... -m attndb_peft ...`), or None when it is not one."""
    if command[0] == "attndb":
        return command[1:]
    if "attndb_peft" in command and command[command.index("attndb_peft") - 1] == "-m":
        return command[command.index("attndb_peft") + 1 :]
    return None


def test_docs_have_blocks():
    names = {p.name for p in DOC_FILES}
    assert {"README.md", "CONTRIBUTING.md", "method.md", "world.md", "comparison.md"} <= names
    assert len(SHELL_BLOCKS) > 10 and len(PYTHON_BLOCKS) > 3


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda b: b.where)
def test_every_attndb_command_parses(block):
    """Run or not, every `attndb` command in the docs parses with the real parser (flags cannot drift)."""
    parser = build_parser()
    for command in commands(block):
        argv = attndb_argv(command)
        if argv is None:
            continue
        argv = [a for a in argv if a not in ELLIPSIS]
        # `--device` checks at parse time that the device exists; the flag's name is what is checked here
        argv = ["cpu" if a == "cuda" and argv[i - 1] == "--device" else a for i, a in enumerate(argv)]
        try:
            parser.parse_args(argv)
        except SystemExit as exc:  # argparse's usage error
            pytest.fail(f"{block.where}: `attndb {' '.join(argv)}` does not parse (exit {exc.code})")


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda b: b.where)
def test_benchmark_commands_name_real_scripts_and_flags(block):
    for command in commands(block):
        scripts = [a for a in command if a.endswith(".py") and "/" in a]
        if command[0] != "python" or not scripts:
            continue
        script = ROOT / scripts[0]
        assert script.is_file(), f"{block.where}: {scripts[0]} does not exist"
        source = script.read_text(encoding="utf-8")
        for flag in (a for a in command if a.startswith("--")):
            assert f'"{flag}"' in source, f"{block.where}: {scripts[0]} has no flag {flag}"


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda b: b.where)
def test_unmarked_blocks_are_attndb_commands(block):
    """A block without a `not run` marker is run by `test_offline_blocks_run`: it must hold only attndb commands."""
    if block.not_run is not None:
        assert block.not_run, f"{block.where}: the not-run marker gives no reason"
        return
    for command in commands(block):
        assert command[0] == "attndb", f"{block.where}: `{' '.join(command)}` cannot run offline: mark the block"


# ------------------------------------------------------------------------------------------- running blocks
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _set(argv: list[str], flag: str, value: str | None) -> list[str]:
    """argv with `flag` set to `value` (replaced where present, else appended; value None: a bare flag)."""
    if flag in argv:
        i = argv.index(flag)
        if value is not None:
            argv[i + 1] = value
        return argv
    return argv + ([flag] if value is None else [flag, value])


def offline_argv(argv: list[str], tiny: Path, tiny_sdxl: Path | None = None) -> list[str]:
    """A doc command made to run in seconds: Hub ids -> the tiny model of their family, a few steps, no samples."""
    argv = [a for a in argv if a not in ELLIPSIS]
    for i, arg in enumerate(argv[:-1]):
        if arg in {"--model", "--model-config"} and HUB_ID.match(argv[i + 1]) and not Path(argv[i + 1]).exists():
            argv[i + 1] = str(tiny_sdxl if tiny_sdxl is not None and "-xl-" in argv[i + 1] else tiny)
    argv = [re.sub(r"stage3-step\d+", "stage3-step2", a) for a in argv]
    command = argv[0]
    if command == "train":
        argv = _set(argv, "--steps", "2,2,2")
        argv = _set(argv, "--batch-size", "2")
        argv = _set(argv, "--gradient-accumulation-steps", "1")  # (SDXL's default is 4)
        if "--checkpointing-steps" in argv:
            argv = _set(argv, "--checkpointing-steps", "1")
        argv = [a for a in argv if a != "--validation-prompts"] + ["--validation-prompts"]  # no samples
    elif command in {"generate", "inspect"}:
        argv = _set(argv, "--steps", "2")
        if command == "generate":
            argv = _set(argv, "--num-images", "1")
    elif command == "demo":
        argv = _set(argv, "--steps", "2,2,2")
    return argv + ["-q"]


#: Stand-ins in the Python blocks: another LoRA (an adapter folder written by the README's training block).
PYTHON_STAND_INS = {'"some-user/watercolor-lora"': '"./my-dog-15"'}


def offline_python(text: str, tiny: Path) -> str:
    """A doc Python block made to run on the CPU: Hub model ids -> the tiny model, no fp16, no `.to("cuda")`."""
    for old, new in PYTHON_STAND_INS.items():
        text = text.replace(old, new)
    text = re.sub(r'"(?:sd2-community|stable-diffusion-v1-5|stabilityai)/[\w.-]+"', repr(str(tiny)), text)
    text = re.sub(r",\s*torch_dtype=torch\.float16", "", text)
    return text.replace('.to("cuda")', "")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder with what the docs' commands expect: tiny models standing in for every Hub id (SD and SDXL), a
    single-file checkpoint of the tiny SD model (`./my-finetune.safetensors`) and the photos in ./my_dog."""
    folder = tmp_path_factory.mktemp("docs")
    tiny = save_tiny_pipeline(folder / "tiny-model")
    tiny_sdxl = save_tiny_sdxl_pipeline(folder / "tiny-sdxl-model")
    save_tiny_single_file(folder / "my-finetune.safetensors")
    make_instance_images(folder / "my_dog", num_images=4, size=48)
    return folder, tiny, tiny_sdxl


@pytest.mark.slow  # about 15-30 s on 2 shared cores: 14 tiny or world runs
def test_offline_blocks_run(workspace, monkeypatch):
    """Every unmarked command block runs, in file order, in one folder (later blocks use earlier outputs)."""
    folder, tiny, tiny_sdxl = workspace
    monkeypatch.chdir(folder)
    ran = 0
    for block in SHELL_BLOCKS:
        if block.not_run is not None:
            continue
        for command in commands(block):
            argv = offline_argv(command[1:], tiny, tiny_sdxl)
            code = main(argv)
            assert code == 0, f"{block.where}: `attndb {' '.join(argv)}` exited {code}"
            ran += 1
    assert ran >= 10
    for block in PYTHON_BLOCKS:  # then the Python blocks, each with a fresh pipeline as `pipe`
        if block.not_run is None:
            from diffusers import StableDiffusionPipeline

            namespace = {"pipe": StableDiffusionPipeline.from_pretrained(str(tiny))}
            exec(compile(offline_python(block.text, tiny), block.where, "exec"), namespace)
            ran += 1
    # what the commands promise to write
    assert (folder / "my-dog" / "attndb_kohya.safetensors").is_file()
    assert json.loads((folder / "my-dog-xl" / "attndb_config.json").read_text())["family"] == "sdxl"
    assert (folder / "my-dog-ft" / "attndb_embedding.safetensors").is_file()
    assert (folder / "my-dog-step300" / "pytorch_lora_weights.safetensors").is_file()
    assert (folder / "scores.json").is_file()


# ------------------------------------------------------------------------------------------- python blocks
@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.where)
def test_python_blocks_compile_and_their_imports_resolve(block):
    tree = ast.parse(block.text, filename=block.where)  # a SyntaxError fails the test
    compile(tree, block.where, "exec")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("attndb_peft"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{block.where}: {node.module} has no {alias.name}"
        if isinstance(node, ast.Attribute) and node.attr in {"load_attndb", "unload_attndb"}:
            import diffusers

            import attndb_peft  # noqa: F401  (adds the methods)

            for cls in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
                assert hasattr(getattr(diffusers, cls), node.attr)


# ------------------------------------------------------------------------------------------- the rules
def test_readme_is_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250


FORBIDDEN = re.compile(r"\bsessions?\b|\bitems? \d|\bissues? \d|#\d{2,}\b|build machine", re.IGNORECASE)


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_speak_of_the_project_only(path):
    text = path.read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), 1):
        assert not FORBIDDEN.search(line), f"{path.name}:{number}: {line.strip()}"
        assert "http://" not in line and "https://" not in line, f"{path.name}:{number}: link outside the repo"


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        file = target.split("#")[0]
        if not file:
            continue
        assert (path.parent / file).exists(), f"{path.name}: broken link {target}"
        if "#" in target and file.endswith(".md"):
            assert target.split("#")[1] in anchors(path.parent / file), f"{path.name}: no heading for {target}"


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    headings = re.findall(r"^#+\s+(.+?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_model_card_names_the_files_the_readme_names(family, tmp_path):
    """A rendered model card (another page a user reads) gives the same loading facts as the README, and its
    Python snippets compile; the SDXL card's stock-diffusers snippet pools at end-of-text."""
    import torch

    from attndb_peft.config import AttnDBConfig
    from attndb_peft.export import LoraFactors, render_model_card
    from attndb_peft.families import FAMILIES

    config = AttnDBConfig(model="someone/base", images=str(tmp_path), category="dog", output=str(tmp_path / "o"))
    lora = {"down_blocks.0.attentions.0.proj_in": LoraFactors(torch.zeros(4, 8), torch.zeros(8, 4))}
    card = render_model_card(config, lora, {}, [], embedding_dim=1024, family=FAMILIES[family])
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for fact in (
        "load_attndb(",
        "attndb_kohya.safetensors",
        "attndb_embedding.safetensors",
        "pytorch_lora_weights.safetensors",
        "models/Lora/",
        "models/loras/",
        "embedding:",
        "InvokeAI",
    ):
        assert fact in card and fact in readme, fact
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 3
    for block in blocks:
        compile(block, "model card", "exec")
    assert ("eos_token_id" in blocks[2]) == (family == "sdxl")
