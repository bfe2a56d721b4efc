"""The config schema: YAML inheritance, strict overrides, cross-field validation, derived values."""

import dataclasses
import textwrap

import pytest

from shared import cli
from shared import config as C
from shared.config import ConfigError
from shared.plan import plan_run

T2I = ["--pretrained_model_name_or_path", "m", "--dataset_name", "d"]
DB = [
    "--pretrained_model_name_or_path",
    "m",
    "--instance_data_dir",
    "i",
    "--instance_prompt",
    "sks",
]


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def parse(argv, task="text2image", backend="torch"):
    return cli.parse_args(argv, task=task, backend=backend)


# --- YAML ---------------------------------------------------------------------------------------


def test_yaml_flat_and_nested_with_base_chain(tmp_path):
    write(tmp_path / "base.yaml", "learning_rate: 3.0e-5\nresolution: 256\ncenter_crop: true\n")
    (tmp_path / "sub").mkdir()
    write(
        tmp_path / "sub" / "run.yaml",
        """\
        base_config: ../base.yaml
        optim:
          learning_rate: 2.0e-5
        training: {train_batch_size: 3}
        random_flip: true
        """,
    )
    cfg = parse(["--config", str(tmp_path / "sub" / "run.yaml"), *T2I, "--resolution", "128"])
    assert cfg.optim.learning_rate == 2e-5  # child overrides base
    assert cfg.data.resolution == 128  # CLI overrides YAML
    assert cfg.data.center_crop and cfg.data.random_flip  # from base and child
    assert cfg.training.train_batch_size == 3


def test_yaml_base_list_applies_in_order(tmp_path):
    write(tmp_path / "a.yaml", "learning_rate: 1.0e-3\nseed: 1\n")
    write(tmp_path / "b.yaml", "learning_rate: 2.0e-3\n")
    write(tmp_path / "c.yaml", "base_config: [a.yaml, b.yaml]\n")
    cfg = parse(["--config", str(tmp_path / "c.yaml"), *T2I])
    assert (cfg.optim.learning_rate, cfg.training.seed) == (2e-3, 1)


def test_yaml_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base_config: b.yaml\n")
    write(tmp_path / "b.yaml", "base_config: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        cli.load_yaml(tmp_path / "a.yaml")


def test_yaml_unknown_key_names_file_and_closest_key(tmp_path):
    path = write(tmp_path / "bad.yaml", "optim:\n  lerning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"lerning_rate.*bad\.yaml.*did you mean 'learning_rate'"):
        cli.load_yaml(path)


def test_yaml_key_under_wrong_component(tmp_path):
    path = write(tmp_path / "bad.yaml", "optim:\n  resolution: 64\n")
    with pytest.raises(ConfigError, match="'resolution' belongs under 'data', not 'optim'"):
        cli.load_yaml(path)


def test_yaml_bad_value_type_names_flag_and_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "train_batch_size: many\n")
    with pytest.raises(ConfigError, match=r"--train_batch_size \(from .*bad\.yaml\): expected int"):
        cli.load_yaml(path)


def test_yaml_bare_no_means_no(tmp_path):
    # YAML 1.1 turns a bare `no` into False; mixed_precision: no must still mean "no".
    path = write(tmp_path / "mp.yaml", "mixed_precision: no\n")
    assert cli.load_yaml(path)["mixed_precision"] == "no"


def test_invalid_yaml_and_missing_file(tmp_path):
    path = write(tmp_path / "broken.yaml", "a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        cli.load_yaml(path)
    with pytest.raises(ConfigError, match="not found"):
        cli.load_yaml(tmp_path / "missing.yaml")


def test_config_task_mismatch(tmp_path):
    path = write(tmp_path / "db.yaml", "task: dreambooth\n")
    with pytest.raises(ConfigError, match=r"for task 'dreambooth'.*runs 'text2image'"):
        parse(["--config", str(path), *T2I])


# --- command line --------------------------------------------------------------------------------


def test_cli_unknown_flag_suggests():
    with pytest.raises(ConfigError, match="did you mean 'train_batch_size'"):
        parse([*T2I, "--train_batchsize", "2"])
    with pytest.raises(ConfigError, match="see --help"):
        parse([*T2I, "--zzzz", "2"])


def test_cli_forms():
    cfg = parse([*T2I, "--center_crop", "--random_flip=false", "--noise_offset=-0", "--seed=7"])
    assert cfg.data.center_crop and not cfg.data.random_flip and cfg.training.seed == 7
    with pytest.raises(ConfigError, match="--seed needs a value"):
        parse([*T2I, "--seed"])
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        parse([*T2I, "stray"])
    with pytest.raises(ConfigError, match="--validation_prompts needs at least one value"):
        parse([*T2I, "--validation_prompts", "--seed", "1"])
    with pytest.raises(ConfigError, match=r"--center_crop .*expected bool"):
        parse([*T2I, "--center_crop=maybe"])


def test_aliases_of_unconditional_flags():
    cfg = parse(
        ["--dataset_name", "d", "--num_epochs", "7", "--logger", "wandb"], task="unconditional"
    )
    assert cfg.training.num_train_epochs == 7 and cfg.logging.report_to == "wandb"


def test_help_lists_task_flags_only(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--help"], task="dreambooth")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--with_prior_preservation" in text and "--instance_prompt" in text
    assert "--dataset_name" not in text  # a text2image/unconditional flag
    assert "--parallelism" not in text  # a flax-only flag, this is torch


# --- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "argv", "message"),
    [
        (
            "dreambooth",
            [*DB, "--with_prior_preservation", "--class_prompt", "dog"],
            "needs --class_data_dir",
        ),
        (
            "dreambooth",
            [*DB, "--with_prior_preservation", "--class_data_dir", "c"],
            "needs --class_prompt",
        ),
        (
            "dreambooth",
            [*DB, "--train_text_encoder", "--pre_compute_text_embeddings"],
            "cannot be combined",
        ),
        (
            "text2image",
            [*T2I, "--instance_prompt", "x"],
            "--instance_prompt is a flag of dreambooth",
        ),
        ("text2image", [*T2I, "--resolution", "500"], "multiple of 8"),
        ("text2image", [*T2I, "--prediction_type", "sample"], "for the unconditional task"),
        (
            "text2image",
            [*T2I, "--lr_scheduler", "cosine_annealing"],
            "choose one of: linear, cosine",
        ),
        ("text2image", [*T2I, "--train_batch_size", "0"], "--train_batch_size must be at least 1"),
        ("text2image", [*T2I, "--learning_rate", "-1"], "--learning_rate must be >= 0"),
        ("text2image", [*T2I, "--adam_beta2", "1.0"], r"--adam_beta2 must be in \[0, 1\)"),
        ("text2image", [*T2I, "--snr_gamma", "0"], "--snr_gamma must be > 0"),
        ("text2image", [*T2I, "--hub_token", "secret", "--report_to", "wandb"], "expose the token"),
        ("text2image", [*T2I, "--max_bad_image_fraction", "2"], "max_bad_image_fraction"),
        (
            "dreambooth",
            [*DB, "--offset_noise", "--noise_offset", "0.3"],
            "conflicts with --noise_offset",
        ),
        ("text2image", [*T2I, "--parallelism", "mesh"], "--parallelism is a flax-only flag"),
    ],
)
def test_validation_errors(task, argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(argv, task=task)


def test_backend_only_flags_refused_on_the_other_backend():
    with pytest.raises(ConfigError, match="torch-only flag; flax uses a fused attention"):
        parse([*T2I, "--enable_xformers_memory_efficient_attention"], backend="flax")
    with pytest.raises(ConfigError, match="use --mixed_precision=bf16"):
        parse([*T2I, "--mixed_precision", "fp16"], backend="flax")
    cfg = parse([*T2I, "--parallelism", "mesh", "--fsdp_size", "4"], backend="flax")
    assert (cfg.flax.parallelism, cfg.flax.fsdp_size) == ("mesh", 4)


def test_class_flags_without_prior_preservation_warn(caplog):
    cfg = parse([*DB, "--class_prompt", "a dog"], task="dreambooth")
    assert not cfg.diffusion.with_prior_preservation
    assert "ignored without --with_prior_preservation" in caplog.text


def test_inline_architecture_replaces_pretrained_path():
    values = {"unet_config": {"a": 1}, "vae_config": {"b": 2}, "text_encoder_config": {"c": 3}}
    with pytest.raises(ConfigError, match="--pretrained_model_name_or_path is required"):
        C.build("text2image", "torch", {**values, "dataset_name": "d"})
    cfg = C.build("text2image", "torch", {**values, "dataset_name": "d", "tokenizer_name": "tok"})
    assert cfg.model.unet_config["a"] == 1


def test_configs_are_frozen():
    cfg = parse(T2I)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.learning_rate = 1.0
    cfg = C.build("text2image", "torch", {"dataset_name": "d", "pretrained_model_name_or_path": "m",
                                          "unet_config": {"block_out_channels": [1, 2]}})  # fmt: skip
    with pytest.raises(TypeError):
        cfg.model.unet_config["x"] = 1
    assert cfg.model.unet_config["block_out_channels"] == (1, 2)


def test_derived_properties():
    cfg = parse([*DB, "--offset_noise", "--validation_prompt", "v"], task="dreambooth")
    assert cfg.noise_offset_scale == 0.1 and cfg.validation_prompt_list == ("v",)
    assert cfg.seed == 0  # no --seed: data order and noise still reproducible
    cfg = parse([*T2I, "--validation_prompts", "a", "b", "--seed", "3"])
    assert cfg.validation_prompt_list == ("a", "b") and cfg.seed == 3


# --- serialization -------------------------------------------------------------------------------------


def test_yaml_round_trip_and_redaction(tmp_path):
    cfg = parse(
        [*DB, "--hub_token", "hf_secret", "--with_prior_preservation", "--class_data_dir", "c",
         "--class_prompt", "dog", "--validation_prompt", "café ☕", "--seed", "5"],
        task="dreambooth",
    )  # fmt: skip
    path = cli.save_config(cfg, tmp_path / "run" / "config.yaml")
    text = path.read_text()
    assert "hf_secret" not in text and "<redacted>" in text
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left
    loaded = cli.load_saved_config(path)
    assert loaded == dataclasses.replace(cfg, hub=dataclasses.replace(cfg.hub, hub_token=None))


def test_round_trip_of_an_architecture_config():
    values = cli.load_yaml("models/sd21.yaml")
    cfg = C.build("text2image", "flax", {**values, "dataset_name": "d", "tokenizer_name": "t"})
    again = C.build("text2image", "flax", {k: v for k, v in _flat(cli.to_dict(cfg)).items()})
    assert again == cfg
    assert cli.to_dict(cfg)["model"]["unet_config"]["attention_head_dim"] == [5, 10, 20, 20]


def _flat(nested):
    out = {}
    for key, value in nested.items():
        if key in C.COMPONENTS:
            out.update(value)
    return out


# --- derived values --------------------------------------------------------------------------------------


def test_plan_run_numbers():
    cfg = parse([*T2I, "--train_batch_size", "4", "--gradient_accumulation_steps", "3",
                 "--num_train_epochs", "2", "--learning_rate", "1e-5", "--scale_lr"])  # fmt: skip
    plan = plan_run(cfg, dataset_size=1000, num_devices=8, num_processes=2)
    assert plan.global_batch_size == 32 and plan.per_process_batch_size == 16
    assert plan.effective_batch_size == 96
    assert plan.batches_per_epoch == 31  # 1000 // 32, remainder dropped
    assert plan.updates_per_epoch == 11  # ceil(31 / 3)
    assert (plan.max_train_steps, plan.num_train_epochs) == (22, 2)
    assert plan.learning_rate == pytest.approx(1e-5 * 96)
    assert cfg.optim.learning_rate == 1e-5  # the config is never changed


def test_plan_run_max_steps_sets_epochs_and_errors():
    cfg = parse([*T2I, "--train_batch_size", "2", "--max_train_steps", "25"])
    plan = plan_run(cfg, dataset_size=20)
    assert (plan.updates_per_epoch, plan.max_train_steps, plan.num_train_epochs) == (10, 25, 3)
    assert plan.learning_rate == cfg.optim.learning_rate
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        plan_run(cfg, dataset_size=7, num_devices=4)
    with pytest.raises(ConfigError, match="split evenly"):
        plan_run(cfg, dataset_size=100, num_devices=3, num_processes=2)
