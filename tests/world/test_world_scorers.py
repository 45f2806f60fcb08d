# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The world's pixel scorers on ground-truth renders (clean and degraded), and `attndb world concept / score`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from attndb_peft.cli import main
from attndb_peft.world import scorers
from attndb_peft.world.scenes import (
    CATEGORIES,
    COLOURS,
    CONTEXTS,
    STYLES,
    Scene,
    caption,
    concept_photos,
    make_concept,
    render,
)
from attndb_peft.world.scorers import degrade, parse_caption, score_image, summarize, validate_scorers

# On a fixed sample of 150 fresh scenes (half of them concepts from seeds far from any tuning).
CLEAN_BAR = 0.95
DEGRADED_BAR = {"style": 0.93, "context": 0.93, "colour": 0.88, "category": 0.85, "present": 0.85,
                "identity": 0.75, "absent": 0.9}


@pytest.fixture(scope="module")
def validation():
    return validate_scorers(num=150, seed=12345)


def test_every_scorer_is_accurate_on_clean_ground_truth(validation):
    clean = validation["clean"]
    for name in ("style", "context", "colour", "category", "present", "identity", "absent"):
        assert clean[name] >= CLEAN_BAR, (name, clean[name], validation["counts"][name])
    assert validation["counts"]["identity"] >= 40 and validation["counts"]["absent"] >= 10


def test_scorers_stay_accurate_on_degraded_ground_truth(validation):
    for name, bar in DEGRADED_BAR.items():
        assert validation["degraded"][name] >= bar, (name, validation["degraded"][name])


@pytest.mark.parametrize("style", list(STYLES))
def test_each_style_is_recognized_in_every_context(style):
    rng = np.random.default_rng(7)
    for context in [None, *CONTEXTS]:
        for category in CATEGORIES:
            scene = Scene(category=category, colour="blue", context=context, style=style)
            image, _ = render(scene, rng)
            r = score_image(image, scene)
            assert r["style"] == style, (scene, r)
            if style == "sketch":
                assert r["context"] is None and r["context_ok"] is None and r["colour_ok"] is None
            else:
                assert r["context_ok"] and r["colour_ok"], (scene, r)


def test_every_colour_and_category_on_the_plain_backdrop():
    rng = np.random.default_rng(3)
    for colour in COLOURS:
        for category in CATEGORIES:
            scene = Scene(category=category, colour=colour)
            r = score_image(render(scene, rng)[0], scene)
            assert (r["colour"], r["category"], r["present"]) == (colour, category, True), (scene, r)


def test_identity_ranks_the_concept_above_distractors():
    rng = np.random.default_rng(11)
    seeds = [int(s) for s in rng.integers(10**7, 2**31, 20)]  # never tuned on
    right = 0
    for seed in seeds:
        concept = make_concept(seed)
        scene = Scene(category=concept.category, context="beach")
        image, _ = render(scene, rng, concept=concept)
        r = score_image(image, scene, concept)
        right += r["identity_ok"]
        # the same picture scored against another concept of its category is far less like it
        other = next(c for c in scorers.distractor_concepts(concept.category) if c.pattern != concept.pattern)
        assert score_image(image, scene, other)["identity"] < r["identity"]
    assert right >= 19


def test_a_plain_object_is_not_the_concept_and_an_empty_picture_has_no_object():
    concept = make_concept(10**8)
    scene = Scene(category=concept.category, context="grass")
    rng = np.random.default_rng(0)
    plain, _ = render(Scene(category=concept.category, colour="red", context="grass"), rng)
    assert score_image(plain, scene, concept)["identity_ok"] is False
    empty = scorers._empty_picture(scene, rng)
    r = score_image(empty, scene, concept)
    assert (r["present"], r["identity"], r["identity_ok"]) == (False, 0.0, False)


def test_degrade_keeps_shape_and_changes_pixels():
    image, _ = render(Scene(category="ball", colour="red", context="snow"), np.random.default_rng(0))
    out = degrade(image, np.random.default_rng(1))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert 2 < np.abs(out.astype(int) - image).mean() < 40


def test_parse_caption_inverts_caption():
    for scene in (Scene("ball"), Scene("cone", "purple", "beach", "painting"), Scene("box", None, "brick", "sketch")):
        assert parse_caption(caption(scene)) == (scene, None)
        assert parse_caption(caption(scene, "<attndb-x>"), "<attndb-x>") == (scene, "<attndb-x>")
    for bad in ("a drawing of a ball", "a photo of a dog", "a photo of a ball on the moon", "a photo of a red"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_summarize_means_over_applicable_records():
    records = [
        {"style_ok": True, "context_ok": None, "colour_ok": False, "present": True, "identity": 0.5,
         "identity_ok": True, "category_ok": True},
        {"style_ok": False, "context_ok": True, "colour_ok": None, "present": True, "identity": None,
         "identity_ok": None, "category_ok": True},
    ]
    s = summarize(records)
    assert s["num_images"] == 2 and s["style_ok"] == 0.5 and s["context_ok"] == 1.0 and s["colour_ok"] == 0.0
    assert s["identity"] == 0.5 and s["counts"]["identity_ok"] == 1 and s["counts"]["present"] == 2
    assert s["text_alignment"] == (0.5 + 0.5) / 2  # (style 1, colour 0) and (style 0, context 1)
    assert summarize([])["style_ok"] is None and summarize([])["text_alignment"] is None


# ---------------------------------------------------------------------------------------------- commands
def test_world_concept_writes_photos_and_json(tmp_path, capsys):
    out = tmp_path / "concept"
    assert main(["world", "concept", "--seed", "42", "--output", str(out), "--num-images", "4", "-q"]) == 0
    info = json.loads((out / "concept.json").read_text())
    concept = make_concept(42)
    assert info["category"] == concept.category and info["pattern"] == concept.pattern
    assert info["token"] == f"<attndb-{concept.category}>" and info["description"] == concept.describe()
    assert info["images"] == [f"instance_{i:02d}.png" for i in range(4)]
    for i, photo in enumerate(concept_photos(concept, 4)):
        assert np.array_equal(np.asarray(Image.open(out / f"instance_{i:02d}.png")), photo)
    assert main(["world", "concept", "--seed", "42", "--output", str(tmp_path / "five"), "-q"]) == 0
    assert len(list((tmp_path / "five").glob("instance_*.png"))) == 5


def _generation_folder(tmp_path, prompts_scenes):
    """A folder in `attndb generate`'s format: written by the real `write_generation` with a tiny random pipeline,
    then each PNG replaced by a ground-truth render of its prompt."""
    from attndb_peft.inference import write_generation
    from attndb_peft.testing import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path / "gen"
    prompts = [p for p, _ in prompts_scenes]
    write_generation(pipe, prompts, folder, num_images=1, steps=2)
    info = json.loads((folder / "generate.json").read_text())
    assert [r["prompt"] for r in info["images"]] == prompts
    return folder, info


def test_world_score_reads_a_generate_folder(tmp_path, capsys):
    concept_dir = tmp_path / "concept"
    main(["world", "concept", "--seed", "20260", "--output", str(concept_dir), "-q"])
    concept = make_concept(20260)
    token = json.loads((concept_dir / "concept.json").read_text())["token"]
    scenes = [
        Scene(concept.category, None, "beach", "photo"),
        Scene(concept.category, "purple", "snow", "painting"),
        Scene(concept.category, None, None, "sketch"),
        Scene("box" if concept.category != "box" else "ball", "red", "grass", "photo"),
    ]
    prompts = [(caption(s, token if s.category == concept.category else None), s) for s in scenes]
    folder, info = _generation_folder(tmp_path, prompts)
    capsys.readouterr()
    # the tiny random model's own pictures: scored without error (they are noise)
    assert main(["world", "score", "--concept", str(concept_dir), "--images", str(folder), "-q"]) == 0
    noise = json.loads(capsys.readouterr().out)
    assert len(noise["images"]) == 4
    # ground truth in their place: scored right
    rng = np.random.default_rng(5)
    for record, (_, scene) in zip(info["images"], prompts):
        use = concept if scene.category == concept.category else None
        Image.fromarray(render(scene, rng, concept=use)[0]).save(folder / record["file"])
    out_file = tmp_path / "scores" / "score.json"
    assert main(["world", "score", "--concept", str(concept_dir), "--images", str(folder), "--output",
                 str(out_file), "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out_file.read_text())
    images = result["images"]
    assert [r["prompt"] for r in images] == [p for p, _ in prompts]
    assert all(r["style_ok"] and r["present"] for r in images)
    assert images[0]["context_ok"] and images[1]["context_ok"] and images[2]["context_ok"] is None
    assert images[1]["colour_ok"] and images[3]["colour_ok"]
    assert images[0]["identity_ok"] and images[1]["identity"] is not None and images[3]["identity"] is None
    s = result["summary"]
    assert s["num_images"] == 4 and s["style_ok"] == 1.0 and s["present"] == 1.0 and s["counts"]["identity"] == 2


def _error(capsys, argv) -> str:
    """Run `attndb ARGV`: exit code 2 (argparse's or main's) and a single line on stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("seed", ["-1", "1.5", "abc"])
def test_world_concept_rejects_a_bad_seed(tmp_path, capsys, seed):
    line = _error(capsys, ["world", "concept", "--seed", seed, "--output", str(tmp_path / "c")])
    assert "--seed" in line and "non-negative whole number" in line
    assert not (tmp_path / "c").exists()


def test_world_score_errors_name_the_argument_and_the_fix(tmp_path, capsys):
    concept_dir = tmp_path / "concept"
    main(["world", "concept", "--seed", "3", "--output", str(concept_dir), "-q"])
    token = json.loads((concept_dir / "concept.json").read_text())["token"]
    images = tmp_path / "images"
    images.mkdir()
    out = tmp_path / "out.json"

    def score(concept, folder):
        return _error(capsys, ["world", "score", "--concept", str(concept), "--images", str(folder), "--output",
                               str(out)])

    line = score(tmp_path / "nope", images)
    assert "--concept" in line and "no such folder" in line and "attndb world concept" in line
    line = score(images, images)
    assert "--concept" in line and "concept.json" in line
    line = score(concept_dir, tmp_path / "missing")
    assert "--images" in line and "no such folder" in line and "attndb generate" in line
    line = score(concept_dir, images)
    assert "--images" in line and "generate.json" in line and "attndb generate" in line
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "00.png")
    (images / "generate.json").write_text(json.dumps({"images": [{"file": "00.png", "prompt": "a cat in space",
                                                                  "seed": 0}]}))
    line = score(concept_dir, images)
    assert "'a cat in space'" in line and "not a world caption" in line and token in line
    assert not out.exists()
