"""Tracking and logs of a Distiller run: trackers through accelerate (TensorBoard event files with
the loss scalars), ``RUN_DIR/train.log`` with the step lines, and the progress-bar default."""

from __future__ import annotations

import io
import json
import logging

import pytest

from kdforge.errors import ConfigError
from kdforge.train import ClassificationTask, Distiller, LossTerm, TrainConfig
from kdforge.train.tracking import log_to_file, progress_enabled

from ._tiny import MLP, ClassDataset


def _distiller(tmp_path, **cfg):
    config = {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "log_every": 1, "output_dir": str(tmp_path / "run"), **cfg}
    return Distiller(MLP(), MLP(hidden=32), task=ClassificationTask(),
                     objective=[LossTerm("forward_kl", 0.5, {"temperature": 2.0}), LossTerm("cross_entropy", 0.5)],
                     config=config, train_data=ClassDataset())


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(folder.glob("events.out.tfevents.*")), f"no event file in {folder}"
    acc = EventAccumulator(str(folder))  # the run's own events (hparams go to a sub-folder)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_the_logged_losses_per_step(tmp_path):
    pytest.importorskip("tensorboard")
    d = _distiller(tmp_path, log_with="tensorboard", project="kd-test")
    d.train()
    scalars = _scalars(tmp_path / "run" / "tensorboard" / "kd-test")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if r.get("split") == "train"]
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]
    for tag in ("loss", "loss/forward_kl", "loss/cross_entropy"):
        assert [v for _, v in scalars[tag]] == pytest.approx([r[tag] for r in rows], rel=1e-6)


def test_train_log_holds_the_step_lines_and_is_appended_on_resume(tmp_path):
    d = _distiller(tmp_path, save_every=2, max_steps=2)
    d.train()
    log = (tmp_path / "run" / "train.log").read_text()
    assert "step 1/2 loss=" in log and "step 2/2 loss=" in log
    d2 = _distiller(tmp_path, save_every=2, max_steps=4)
    d2.train(resume=True)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "step 2/2 loss=" in log and "step 4/4 loss=" in log and "step 1/4" not in log


def test_the_file_handler_leaves_logging_as_it_found_it(tmp_path):
    logger = logging.getLogger("kdforge")
    before = (logger.level, list(logger.handlers))
    logger.setLevel(logging.WARNING)
    try:
        with log_to_file(tmp_path / "x.log"):
            logging.getLogger("kdforge.something").info("hello %d", 7)
        logging.getLogger("kdforge.something").info("after")
        assert logger.level == logging.WARNING and logger.handlers == before[1]
    finally:
        logger.setLevel(before[0])
    text = (tmp_path / "x.log").read_text()
    assert "INFO kdforge.something: hello 7" in text and "after" not in text


def test_an_uninstalled_tracker_is_a_clear_error_and_an_unknown_one_a_config_error(tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(ConfigError, match=r"tracker 'wandb' is not installed[\s\S]*pip install wandb"):
        _distiller(tmp_path, log_with=["wandb"])
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'"):
        TrainConfig(max_steps=1, log_with=["tensorbord"])


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("progress, tty, ci, shown", [
    ("auto", True, None, True), ("auto", False, None, False), ("auto", True, "true", False),
    (True, False, "true", True), (False, True, None, False),
])
def test_progress_auto_means_a_terminal_outside_ci(monkeypatch, progress, tty, ci, shown):
    for var in ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "BUILDKITE", "JENKINS_URL", "TF_BUILD", "CIRCLECI"):
        monkeypatch.delenv(var, raising=False)
    if ci:
        monkeypatch.setenv("CI", ci)
    assert progress_enabled(progress, _Stream(tty)) is shown
    assert TrainConfig(max_steps=1).progress == "auto"
