"""The launcher's own decisions, in-process: the malloc tunables, the backend a command runs on."""

import sys

import pytest

from shared import launcher


@pytest.fixture
def execs(monkeypatch):
    calls = []
    monkeypatch.setattr(launcher.os, "execve", lambda exe, argv, env: calls.append((argv, env)))
    monkeypatch.setattr(launcher.sys, "platform", "linux")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("TWINDIFF_MALLOC_TUNABLES", raising=False)
    return calls


def test_console_script_reruns_itself_once_with_huge_page_malloc(execs, monkeypatch):
    launcher._reexec_with_malloc_tunables(["demo", "--backend", "torch"])
    ((argv, env),) = execs
    assert argv == [sys.executable, "-m", "shared.launcher", "demo", "--backend", "torch"]
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    monkeypatch.setenv("GLIBC_TUNABLES", env["GLIBC_TUNABLES"])  # the re-executed process
    launcher._reexec_with_malloc_tunables(["demo"])
    assert len(execs) == 1


@pytest.mark.parametrize(
    "env", [{"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, {"TWINDIFF_MALLOC_TUNABLES": "0"}]
)
def test_a_users_tunables_or_opt_out_are_left_alone(execs, monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    launcher._reexec_with_malloc_tunables(["demo"])
    assert execs == []


def test_main_with_argv_never_replaces_the_calling_process(execs, capsys):
    assert launcher.main(["--help"]) == 0
    assert execs == [] and "twindiff demo" in capsys.readouterr().out


def test_backend_comes_from_the_last_config_that_names_one(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("backend: torch\n")
    second.write_text("base_config: digits.yaml\n")
    assert launcher.config_backend(["--config", str(first), "--config", str(second)]) == "torch"
    assert launcher.config_backend(["--config", str(second)]) is None
    assert launcher.config_backend(["--learning_rate", "1e-4"]) is None
