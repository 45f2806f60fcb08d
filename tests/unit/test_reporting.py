# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Training shows its progress: sample grids and attention figures under OUT/samples/, tracker logging, the run
summary -- without changing what is trained."""

from __future__ import annotations

import logging

import pytest
import torch
from accelerate.tracking import GeneralTracker
from conftest import make_config
from PIL import Image
from safetensors.torch import load_file

from attndb_peft.config import AttnDBConfig, ConfigError
from attndb_peft.export import EMBEDDING_NAME, LORA_NAME, MODEL_CARD_NAME
from attndb_peft.reporting import check_report_to, tracker_config
from attndb_peft.trainer import InputError, Trainer

PROMPTS = ("a photo of a {}", "a {} in the jungle")


class RecordingTracker(GeneralTracker):
    """An in-memory accelerate tracker: what `--report-to` would send to TensorBoard or W&B."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.config, self.logged = None, []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, dict(values)))


@pytest.fixture(scope="module")
def sampled_run(tiny_model, instance_dir, tmp_path_factory):
    """The `trained` run's settings plus validation samples every 2 steps and a tracker."""
    tracker = RecordingTracker()
    patch = pytest.MonkeyPatch()
    patch.setattr("attndb_peft.training.runtime.trackers_for", lambda report_to: [tracker])
    logger = logging.getLogger("attndb_peft")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        config = make_config(
            tiny_model,
            instance_dir,
            tmp_path_factory.mktemp("sampled") / "out",
            validation_prompts=PROMPTS,
            validation_steps=2,
            validation_images=2,
            validation_inference_steps=2,
        )
        trainer = Trainer(config)
        trainer.run()
    finally:
        patch.undo()
        logger.removeHandler(handler)
        logger.setLevel(level)
    return trainer, tracker, [r.getMessage() for r in records]


def test_training_writes_sample_grids_and_attention_figures(sampled_run):
    trainer, _, _ = sampled_run
    samples = trainer.output_dir / "samples"
    names = sorted(p.name for p in samples.iterdir())
    expected = [f"stage{s}-step{k}.png" for s in (1, 2, 3) for k in (2, 3)]
    expected += [f"stage{s}-attention.png" for s in (1, 2, 3)] + ["final-00.png", "final-01.png"]
    assert names == sorted(expected)
    assert sorted(trainer.result.sample_files) == sorted(samples / n for n in expected)
    grid = Image.open(samples / "stage2-step3.png")
    cell = 128  # 32-px samples are shown at the grid's minimum cell size
    assert grid.width == 2 * (cell + 4) + 4  # two seeds per prompt
    assert grid.height > len(PROMPTS) * cell
    # the attention figure of the first prompt: the image and one map per token of "a photo of a <attndb-dog> dog"
    figure = Image.open(samples / "stage3-attention.png")
    assert figure.width == (1 + 6) * (cell + 4) + 4


def test_the_model_card_shows_the_final_samples(sampled_run):
    trainer, _, _ = sampled_run
    card = (trainer.output_dir / MODEL_CARD_NAME).read_text()
    assert "![a photo of a <attndb-dog> dog](samples/final-00.png)" in card
    assert "![a <attndb-dog> dog in the jungle](samples/final-01.png)" in card
    assert "url: samples/final-01.png" in card  # the Hub widget
    assert trainer.result.card_samples == [
        ("a photo of a <attndb-dog> dog", "samples/final-00.png"),
        ("a <attndb-dog> dog in the jungle", "samples/final-01.png"),
    ]


def test_samples_do_not_change_what_is_trained(sampled_run, trained):
    """Same settings with and without samples every 2 steps: bit-identical adapters (train mode, the capture
    processors and the RNG are restored after sampling)."""
    sampled, _, _ = sampled_run
    for name in (EMBEDDING_NAME, LORA_NAME):
        a, b = load_file(str(sampled.output_dir / name)), load_file(str(trained.output_dir / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


def test_trackers_get_loss_regularizer_and_lr_on_one_step_axis(sampled_run):
    trainer, tracker, _ = sampled_run
    assert tracker.config["stage2.learning_rate"] == trainer.config.stage2.learning_rate
    assert tracker.config["validation_prompts"] == " | ".join(PROMPTS)
    assert all(isinstance(v, (int, float, str, bool)) for v in tracker.config.values())
    steps = [step for step, _ in tracker.logged]
    assert steps == list(range(1, 10))  # log_every=1, 3 steps per stage, one axis across stages
    for step, values in tracker.logged:
        stage = (step - 1) // 3 + 1
        assert set(values) == {f"stage{stage}/loss", f"stage{stage}/regularizer", f"stage{stage}/lr"}
        assert values[f"stage{stage}/lr"] == trainer.config.stages[stage - 1].learning_rate


def test_run_summary_names_stage_times_memory_and_files(sampled_run):
    _, _, messages = sampled_run
    summary = next(m for m in messages if m.startswith("Run summary"))
    for stage in (1, 2, 3):
        assert f"stage {stage} " in summary
    assert "peak memory:" in summary and "GiB" in summary
    assert "validation samples:" in summary and "11 picture(s)" in summary
    for name in (LORA_NAME, EMBEDDING_NAME, "samples/final-00.png", "checkpoints/ (3 checkpoint(s))"):
        assert name in summary


def test_report_to_needs_its_package(tiny_model, instance_dir, tmp_path, monkeypatch):
    import accelerate.utils

    with pytest.raises(ConfigError, match="report_to"):
        AttnDBConfig(model="m", images="i", category="dog", output="o", report_to="mlflow")
    # as on a machine without tensorboard (the test extra installs it for the real-tracker test below)
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    problem = check_report_to("tensorboard")
    assert "pip install tensorboard" in problem
    with pytest.raises(InputError, match="pip install tensorboard"):
        Trainer(make_config(tiny_model, instance_dir, tmp_path / "out", report_to="tensorboard")).run()
    assert not (tmp_path / "out").exists()


def test_tensorboard_receives_the_scalars(tiny_model, instance_dir, tmp_path):
    """The real tracker: accelerate's TensorBoard writer gets loss, regularizer and lr of every stage."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    Trainer(make_config(tiny_model, instance_dir, out, report_to="tensorboard")).run()
    events = sorted((out / "logs").rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for path in events:
        accumulator = EventAccumulator(str(path.parent))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    for stage in (1, 2, 3):
        assert {f"stage{stage}/loss", f"stage{stage}/regularizer", f"stage{stage}/lr"} <= tags


def test_tracker_config_flattens_nested_settings(tiny_model, instance_dir, tmp_path):
    flat = tracker_config(make_config(tiny_model, instance_dir, tmp_path))
    assert flat["stage1.steps"] == 3 and flat["token"] == "<attndb-dog>" and flat["report_to"] == "none"
