"""Run control in shared/: events, task specs, validation plans, signals, the non-finite policy,
resume rules, the output folder, logging and the summary. No framework is imported here."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest

from shared import cli
from shared.config import ConfigError, build
from shared.errors import TrainingError
from shared.run import events, report, resume
from shared.run import validation as vplan
from shared.run.nonfinite import NonFiniteGuard
from shared.run.output import check_writable, prepare_output_dir
from shared.run.signals import StopRequested, StopSignal
from shared.run.task import task_spec


def dreambooth(tmp_path, **values):
    base = {
        "pretrained_model_name_or_path": "base/model",
        "instance_data_dir": str(tmp_path),
        "instance_prompt": "a photo of sks dog",
        "output_dir": str(tmp_path / "out"),
    }
    return build("dreambooth", "torch", {**base, **values})


def unconditional(tmp_path, **values):
    base = {"train_data_dir": str(tmp_path), "output_dir": str(tmp_path / "out")}
    return build("unconditional", "flax", {**base, **values})


def text2image(tmp_path, **values):
    base = {
        "pretrained_model_name_or_path": "base/model",
        "train_data_dir": str(tmp_path),
        "output_dir": str(tmp_path / "out"),
    }
    return build("text2image", "torch", {**base, **values})


# --- events -----------------------------------------------------------------------------------


def test_due_counts_positive_multiples_only():
    assert events.due(2, [4])
    assert not events.due(2, [3])
    assert not events.due(None, [4]) and not events.due(0, [4])
    assert not events.due(3, [0])
    assert events.due(3, [1, 2, 3])


def test_checkpoint_and_step_validation(tmp_path):
    cfg = dreambooth(tmp_path, checkpointing_steps=3, validation_steps=2)
    fired = [events.after_update(cfg, step=s, epoch_before=0, epoch_after=0) for s in range(1, 7)]
    assert [e.checkpoint for e in fired] == [False, False, True, False, False, True]
    assert [e.validate for e in fired] == [False, True, False, True, False, True]
    assert not any(e.export for e in fired)


def test_epoch_validation_fires_after_the_update_that_finishes_the_epoch(tmp_path):
    cfg = text2image(tmp_path, validation_epochs=2)  # no --validation_steps: epochs decide
    assert events.epoch_interval(cfg) == 2
    assert not events.after_update(cfg, step=5, epoch_before=0, epoch_after=1).validate
    due = events.after_update(cfg, step=9, epoch_before=1, epoch_after=2)
    assert due.validate and due.finished_epochs == (1,)
    # One update may finish two epochs (tiny data, accumulation): either can be due.
    assert events.after_update(cfg, step=3, epoch_before=0, epoch_after=2).validate


def test_step_validation_disables_epoch_validation(tmp_path):
    cfg = text2image(tmp_path, validation_epochs=1, validation_steps=100)
    assert events.epoch_interval(cfg) is None
    assert not events.after_update(cfg, step=7, epoch_before=0, epoch_after=1).validate


def test_unconditional_images_and_exports_by_epoch(tmp_path):
    cfg = unconditional(tmp_path, save_images_epochs=2, save_model_epochs=3)
    due = [
        events.after_update(cfg, step=e + 1, epoch_before=e, epoch_after=e + 1) for e in range(6)
    ]
    assert [d.validate for d in due] == [False, True, False, True, False, True]
    assert [d.export for d in due] == [False, False, True, False, False, True]


# --- task spec and validation plan ------------------------------------------------------------


def test_task_specs(tmp_path):
    u = task_spec(unconditional(tmp_path))
    assert (u.latent, u.text_conditioned, u.validation, u.export_epochs) == (
        False,
        False,
        "ddpm",
        10,
    )
    d = task_spec(
        dreambooth(
            tmp_path,
            with_prior_preservation=True,
            class_data_dir=str(tmp_path),
            class_prompt="a dog",
            train_text_encoder=True,
            skip_save_text_encoder=True,
        )
    )
    assert d.prior_preservation and d.makes_class_images and d.train_text_encoder
    assert not d.save_text_encoder and d.data == "dreambooth" and d.export_epochs is None
    t = task_spec(text2image(tmp_path, dream_training=True))
    assert t.dream and t.latent and t.data == "dataset" and not t.prior_preservation


def test_validation_plans(tmp_path):
    cfg = dreambooth(tmp_path, validation_prompt="a sks dog", num_validation_images=3, seed=7)
    plan = vplan.plan_validation(cfg)
    assert (plan.prompts, plan.images_per_prompt, plan.num_inference_steps, plan.seed) == (
        ("a sks dog",),
        3,
        25,
        7,
    )
    cfg = text2image(tmp_path, validation_prompts=["a", "b"], num_validation_images=3)
    plan = vplan.plan_validation(cfg)
    assert (plan.images_per_prompt, plan.rows, plan.num_inference_steps) == (1, 2, 20)
    cfg = unconditional(tmp_path, eval_batch_size=4, ddpm_num_inference_steps=50)
    plan = vplan.plan_validation(cfg)
    assert (plan.prompts, plan.images_per_prompt, plan.num_inference_steps, plan.seed) == (
        (),
        4,
        50,
        0,
    )
    assert (
        vplan.grid_path(cfg, tag="final", step=12)
        .as_posix()
        .endswith("validation/final-000012.png")
    )
    assert vplan.wants_validation(cfg)
    assert not vplan.wants_validation(text2image(tmp_path))  # no prompt


# --- signals ----------------------------------------------------------------------------------


def test_a_signal_during_setup_raises_with_the_exit_code():
    with StopSignal(), pytest.raises(StopRequested) as info:
        os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.exit_code == 143 and "before training started" in str(info.value)


def test_in_training_the_first_signal_asks_and_a_second_ctrl_c_aborts():
    previous = signal.getsignal(signal.SIGINT)
    with StopSignal() as stop:
        stop.start_training()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def test_first_ctrl_c_is_a_stop_request():
    with StopSignal() as stop:
        stop.start_training()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT"


def test_run_main_reports_stops_and_user_errors(capsys):
    def setup_interrupted():
        raise StopRequested(signal.SIGTERM)

    assert cli.run_main(setup_interrupted) == 143
    assert "stopped by SIGTERM before training started" in capsys.readouterr().err

    def bad_flag():
        raise ConfigError("--resolution must be a multiple of 8")

    assert cli.run_main(bad_flag) == 2
    err = capsys.readouterr().err
    assert err == "error: --resolution must be a multiple of 8\n"

    def unwritable():
        raise PermissionError(13, "Permission denied", "/out/x")

    assert cli.run_main(unwritable) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_run_main_keeps_the_traceback_of_bugs_and_with_debug(capsys, monkeypatch):
    def bug():
        raise ZeroDivisionError("bug")

    with pytest.raises(ZeroDivisionError):
        cli.run_main(bug)

    def bad():
        raise ConfigError("bad flag")

    monkeypatch.setenv("TWINDIFF_DEBUG", "1")
    assert cli.run_main(bad) == 2
    assert "Traceback" in capsys.readouterr().err


# --- non-finite policy ------------------------------------------------------------------------


def test_guard_counts_and_stops_after_the_limit(tmp_path):
    guard = NonFiniteGuard(3, str(tmp_path))
    guard.record(step=1, finite=True, loss=0.5, grad_norm=1.0, lr=1e-4)
    guard.record(step=2, finite=False, loss=float("nan"), grad_norm=1.0, lr=1e-4)
    guard.record(step=3, finite=True, loss=0.5, grad_norm=1.0, lr=1e-4)
    assert (guard.skipped, guard.streak) == (1, 0)
    guard.record(step=4, finite=False, loss=1.0, grad_norm=float("inf"), lr=1e-4)
    guard.record(step=5, finite=False, loss=float("nan"), grad_norm=float("nan"), lr=1e-4)
    with pytest.raises(TrainingError) as info:
        guard.record(step=6, finite=False, loss=float("nan"), grad_norm=float("nan"), lr=1e6)
    message = str(info.value)
    assert "\n" not in message
    assert "3 consecutive steps (4-6)" in message and "1e+06" in message
    assert "last good checkpoint: none" in message
    restored = NonFiniteGuard(3, str(tmp_path))
    restored.restore(guard.state())
    assert (restored.skipped, restored.streak) == (guard.skipped, guard.streak)


# --- resume rules -----------------------------------------------------------------------------


def test_changes_that_take_effect_and_changes_that_are_refused(tmp_path, caplog):
    saved = dreambooth(tmp_path, learning_rate=1e-4, checkpointing_steps=2)
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    cli.save_config(saved, ckpt / "config.yaml")
    assert resume.check_resume_config(ckpt, saved, step=2) == []

    new = dreambooth(tmp_path, learning_rate=5e-5, checkpointing_steps=4, lr_scheduler="cosine")
    with caplog.at_level(logging.WARNING):
        applied = resume.check_resume_config(ckpt, new, step=2)
    assert [c.name for c in applied] == ["learning_rate", "lr_scheduler", "checkpointing_steps"]
    assert "--learning_rate 0.0001 -> 5e-05: takes effect from step 3" in caplog.text

    refused = dreambooth(tmp_path, resolution=256, train_batch_size=2)
    with pytest.raises(ConfigError) as info:
        resume.check_resume_config(ckpt, refused, step=2)
    message = str(info.value)
    assert "\n" not in message
    assert "--train_batch_size 4 -> 2" in message and "--resolution 512 -> 256" in message


def test_every_refused_flag_exists():
    from shared.config import FIELDS

    assert set(resume.REFUSED) <= set(FIELDS)


# --- output folder, logging, summary ----------------------------------------------------------


def test_output_dir_that_is_a_file_or_unwritable(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_writable(blocker)
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_writable(blocker / "below")


def test_output_dir_that_cannot_be_written(tmp_path, monkeypatch):
    # Permissions do not bind root (CI runs as root), so the OS's refusal is simulated.
    def refuse(self, data):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(tmp_path), "write_bytes", refuse)
    with pytest.raises(ConfigError) as info:
        check_writable(tmp_path / "run")
    assert "is not writable (Permission denied)" in str(info.value)
    assert "--output_dir" in str(info.value) and "\n" not in str(info.value)


def test_prepare_output_dir_removes_stale_saves_and_writes_the_config(tmp_path):
    cfg = dreambooth(tmp_path)
    out = tmp_path / "out"
    (out / "checkpoint-7.tmp").mkdir(parents=True)
    prepare_output_dir(cfg, is_main=True)
    assert not (out / "checkpoint-7.tmp").exists()
    assert cli.load_saved_config(out / "config.yaml") == cfg


def test_setup_logging_replaces_its_own_handler(monkeypatch):
    monkeypatch.delenv(report.LEVEL_ENV, raising=False)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        root.handlers[:] = []
        report.setup_logging(default="WARNING")  # the launcher
        report.setup_logging(is_main=True)  # then the trainer: INFO must win
        assert root.level == logging.INFO and len(root.handlers) == 1
        report.setup_logging(is_main=False)
        assert root.level == logging.WARNING
        monkeypatch.setenv(report.LEVEL_ENV, "DEBUG")
        report.setup_logging(is_main=False)
        assert root.level == logging.DEBUG
    finally:
        root.handlers[:], root.level = saved_handlers, saved_level


def test_tracker_config_is_flat_scalars_without_secrets(tmp_path):
    cfg = dreambooth(tmp_path, hub_token="hf_secret", unet_config={"a": 1})
    flat = report.tracker_config(cfg)
    assert "hub_token" not in flat and "unet_config" not in flat
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
    assert flat["learning_rate"] == 5e-6


def test_summary(tmp_path):
    path = report.write_summary(
        tmp_path, steps=4, step_times=[3.0, 1.0, 2.0], peak_memory_bytes=10, device="cpu"
    )
    summary = json.loads(path.read_text())
    assert summary["mean_step_seconds"] == 1.5 and summary["first_step_seconds"] == 3.0
    assert summary["steps_this_run"] == 3 and summary["skipped_steps"] == 0


def test_objective_options_refuse_dream_without_epsilon(tmp_path):
    from shared.run.task import objective_options

    scheduler = {"num_train_timesteps": 10, "prediction_type": "v_prediction"}
    options = objective_options(text2image(tmp_path, snr_gamma=5.0), scheduler)
    assert options["prediction_type"] == "v_prediction" and options["snr_gamma"] == 5.0
    assert options["prior_loss_weight"] is None and options["alphas_cumprod"].shape == (10,)
    with pytest.raises(ConfigError, match="--dream_training works with epsilon prediction only"):
        objective_options(text2image(tmp_path, dream_training=True), scheduler)
    dream = objective_options(
        text2image(tmp_path, dream_training=True, prediction_type="epsilon"), scheduler
    )
    assert dream["prediction_type"] == "epsilon"


def test_handle_runs_events_in_order_and_checkpoints_a_stop_once():
    calls = []
    stop = {"name": None}
    handlers = events.Handlers(
        checkpoint=lambda: calls.append("checkpoint"),
        validate=lambda: calls.append("validate"),
        export=lambda commit: calls.append(f"export {commit}"),
        stop_requested=lambda: stop["name"],
    )
    due = events.Events(checkpoint=True, validate=True, export=True, finished_epochs=(2,))
    assert not events.handle(due, handlers, step=6)
    assert calls == ["checkpoint", "validate", "export Epoch 2"]
    calls.clear()
    stop["name"] = "SIGTERM"
    assert events.handle(events.Events(), handlers, step=7)
    assert calls == ["checkpoint"]  # the stop's own checkpoint
    calls.clear()
    assert events.handle(events.Events(checkpoint=True), handlers, step=8)
    assert calls == ["checkpoint"]  # not twice


def test_a_stop_anywhere_is_a_stop_everywhere():
    from shared.run.process import ProcessGroup

    stop = StopSignal()
    assert stop.requested_anywhere(ProcessGroup()) is None
    other_process_stopped = ProcessGroup(index=0, count=2, all_true=lambda flag: False)
    assert stop.requested_anywhere(other_process_stopped) == "a signal on another process"
    stop.requested = "SIGINT"
    assert stop.requested_anywhere(ProcessGroup()) == "SIGINT"
