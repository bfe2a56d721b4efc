"""--push_to_hub: the model card and the upload call, with a fake Hub API (no network)."""

from __future__ import annotations

import logging

from shared import hub
from shared.config import build


class FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

        class Created:
            pass

        created = Created()
        created.repo_id = f"someone/{repo_id}"
        return created

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))


def _cfg(tmp_path, **values):
    values = {
        "pretrained_model_name_or_path": "base/model",
        "instance_data_dir": str(tmp_path),
        "instance_prompt": "a photo of sks dog",
        "output_dir": str(tmp_path / "dog-model"),
        "push_to_hub": True,
        **values,
    }
    return build("dreambooth", "torch", values)


def test_push_uploads_the_output_folder_without_checkpoints(tmp_path, caplog):
    cfg = _cfg(tmp_path, hub_token="hf_secret_value", hub_private_repo=True)
    (tmp_path / "dog-model").mkdir()
    api = FakeApi()
    with caplog.at_level(logging.DEBUG):
        name = hub.push(cfg, commit_message="End of training", images=["validation/a.png"], api=api)
    assert name == "someone/dog-model"
    (create, repo, create_kwargs), (upload, upload_repo, upload_kwargs) = api.calls
    assert (create, repo, upload, upload_repo) == (
        "create_repo",
        "dog-model",
        "upload_folder",
        "someone/dog-model",
    )
    assert create_kwargs == {"exist_ok": True, "private": True, "token": "hf_secret_value"}
    assert upload_kwargs["token"] == "hf_secret_value"
    assert upload_kwargs["commit_message"] == "End of training"
    assert {"checkpoint-*", "logs/*"} <= set(upload_kwargs["ignore_patterns"])
    card = (tmp_path / "dog-model" / "README.md").read_text()
    assert "base_model: base/model" in card and "- dreambooth" in card
    assert "a photo of sks dog" in card and "![validation](validation/a.png)" in card
    assert "hf_secret_value" not in card + caplog.text


def test_repo_id_defaults_to_the_output_folder_name(tmp_path):
    assert hub.repo_id(_cfg(tmp_path)) == "dog-model"
    assert hub.repo_id(_cfg(tmp_path, hub_model_id="me/dogs")) == "me/dogs"
    card = hub.model_card(build("unconditional", "torch", {"train_data_dir": str(tmp_path)}))
    assert "license" not in card and "- ddpm" in card and "base_model" not in card


def test_check_access_passes_and_returns_the_repo(tmp_path):
    api = FakeApi()
    api.whoami = lambda token=None: {"name": "someone"}
    assert hub.check_access(_cfg(tmp_path, hub_model_id="me/dog"), api=api) == "someone/me/dog"
    assert api.calls[0][0] == "create_repo"


def test_check_access_fails_in_one_line_before_training(tmp_path):
    import pytest

    from shared.config import ConfigError

    class Offline(FakeApi):
        def whoami(self, token=None):
            raise OSError("Failed to resolve 'huggingface.co'\nretrying...")

    with pytest.raises(ConfigError) as info:
        hub.check_access(_cfg(tmp_path), api=Offline())
    message = str(info.value)
    assert message.startswith("--push_to_hub: cannot use the Hub repo 'dog-model'")
    assert "OSError: Failed to resolve 'huggingface.co'" in message and "\n" not in message


def test_check_access_gives_up_after_the_timeout(tmp_path):
    import threading
    import time

    import pytest

    from shared.config import ConfigError

    release = threading.Event()

    class Hanging(FakeApi):
        def whoami(self, token=None):
            release.wait(10)

    started = time.perf_counter()
    with pytest.raises(ConfigError, match="no answer from the Hub in 0 s"):
        hub.check_access(_cfg(tmp_path), api=Hanging(), timeout=0.2)
    release.set()
    assert time.perf_counter() - started < 5
