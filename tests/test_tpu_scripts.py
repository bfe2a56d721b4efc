"""tpu/*.sh: the gcloud commands they print with --dry-run, their quoting, their usage errors.

A fake `gcloud` comes first on PATH. It logs its argv (so a dry run that ran anything leaves a log
behind), and, given a worker home, runs the `--command` of `ssh` there with bash, as a TPU worker's
shell would: that shows that a command reaches the worker word for word.
"""

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu"
SCRIPTS = ["create.sh", "setup.sh", "run.sh", "copy.sh", "delete.sh"]
PROMPT_ARGV = ["python", "-m", "flaxdiff.dreambooth", "--instance_prompt", "a photo of sks dog"]
SSH_PREFIX = "cd ~/twindiff && . ~/twindiff-venv/bin/activate && "

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, subprocess, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
home = os.environ.get("FAKE_WORKER_HOME")
commands = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--command=")]
if home and commands:
    # Output captured through pipes, as ssh does: a detached command that kept them open would
    # make this wait.
    done = subprocess.run(["bash", "-c", commands[0]], cwd=home, env={{**os.environ, "HOME": home}},
                          capture_output=True, text=True)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    sys.exit(done.returncode)
"""


class Fake:
    """The environment of one test: PATH with the fake gcloud, a private TMPDIR, a worker home."""

    def __init__(self, tmp_path: Path):
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        gcloud = bin_dir / "gcloud"
        gcloud.write_text(FAKE_GCLOUD)
        gcloud.chmod(gcloud.stat().st_mode | stat.S_IXUSR)
        self.log = tmp_path / "gcloud-was-run.jsonl"
        self.tmp = tmp_path / "tmp"
        self.tmp.mkdir()
        self.home = tmp_path / "worker"
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "TMPDIR": str(self.tmp),
            "FAKE_GCLOUD_LOG": str(self.log),
        }

    def run(self, script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(TPU / script), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def dry_run(self, script: str, *args: str) -> list[str]:
        """The printed lines of a --dry-run, after checking that it ran nothing."""
        result = self.run(script, *args)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert not self.log.exists(), "a --dry-run ran gcloud"
        assert list(self.tmp.iterdir()) == [], "a --dry-run wrote a file"
        return result.stdout.splitlines()

    def gcloud_calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def make_worker(self) -> Path:
        """A worker's home as setup.sh leaves it; returns the repo folder, run.sh's cwd."""
        repo = self.home / "twindiff"
        repo.mkdir(parents=True)
        (self.home / "twindiff-venv" / "bin").mkdir(parents=True)
        (self.home / "twindiff-venv" / "bin" / "activate").write_text("")
        self.env["FAKE_WORKER_HOME"] = str(self.home)
        return repo


@pytest.fixture
def fake(tmp_path):
    return Fake(tmp_path)


def remote_command(line: str) -> str:
    """The --command=... of a printed `gcloud ... ssh` line, as gcloud receives it."""
    argv = shlex.split(line)
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], line
    (command,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    return command


# create.sh


@pytest.mark.parametrize(
    ("accelerator", "version"),
    [
        ("v3-8", "tpu-ubuntu2204-base"),
        ("v4-8", "tpu-ubuntu2204-base"),
        ("v4-32", "tpu-ubuntu2204-base"),
        ("v5litepod-8", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_create_picks_the_runtime_of_the_generation(fake, accelerator, version):
    lines = fake.dry_run("create.sh", "tw", "europe-west4-a", accelerator, "--dry-run")
    assert lines == [
        f"gcloud compute tpus tpu-vm create tw --zone=europe-west4-a "
        f"--accelerator-type={accelerator} --version={version}"
    ]


def test_create_options_anywhere(fake):
    lines = fake.dry_run(
        "create.sh", "--dry-run", "--spot", "pod", "--project=my-proj", "us-central2-b", "v4-32"
    )
    assert lines == [
        "gcloud compute tpus tpu-vm create pod --zone=us-central2-b --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base --spot --project=my-proj"
    ]
    lines = fake.dry_run("create.sh", "tw", "z", "v3-8", "--version", "tpu-vm-base", "--dry-run")
    assert lines == [
        "gcloud compute tpus tpu-vm create tw --zone=z --accelerator-type=v3-8 "
        "--version=tpu-vm-base"
    ]
    lines = fake.dry_run(
        "create.sh", "tw", "z", "v7x-8", "--version=x", "--preemptible", "--dry-run"
    )
    assert lines[0].endswith("--accelerator-type=v7x-8 --version=x --preemptible")


# setup.sh


def test_setup_packs_the_checkout_and_installs_on_every_worker(fake):
    lines = fake.dry_run("setup.sh", "tw", "europe-west4-a", "--dry-run")
    tarball = f"{fake.tmp}/twindiff-tw.tar.gz"
    assert len(lines) == 3
    assert shlex.split(lines[0])[:2] == ["bash", "-c"]
    assert shlex.split(lines[0])[-2:] == [str(ROOT), tarball]
    assert lines[1] == (
        f"gcloud compute tpus tpu-vm scp {tarball} tw:twindiff.tar.gz "
        "--zone=europe-west4-a --worker=all"
    )
    assert lines[2].startswith(
        "gcloud compute tpus tpu-vm ssh tw --zone=europe-west4-a --worker=all --command="
    )
    steps = remote_command(lines[2]).split("; ")
    assert steps[:5] == [
        "set -e",
        "mkdir -p ~/twindiff",
        "tar -xzf ~/twindiff.tar.gz -C ~/twindiff",
        "rm -f ~/twindiff.tar.gz",
        "cd ~/twindiff",
    ]
    assert ". ~/twindiff-venv/bin/activate" in steps
    assert "pip install -q -e '.[flax,tpu,data]'" in steps
    assert "--python 3.12 ~/twindiff-venv" in remote_command(lines[2])


def test_setup_pack_command_packs_what_git_sees(fake, tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    pack = shlex.split(fake.dry_run("setup.sh", "tw", "z", "--dry-run")[0])
    tarball = tmp_path / "out.tar.gz"
    subprocess.run([*pack[:-1], str(tarball)], check=True, timeout=60)  # the line as printed
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "tpu/setup.sh", "tests/test_tpu_scripts.py"} <= names
    assert not any(name.startswith((".venv/", ".git/")) for name in names)


def test_setup_from_a_git_repo(fake):
    lines = fake.dry_run(
        "setup.sh", "tw", "z", "--repo", "https://github.com/twindiff/twindiff.git",
        "--ref", "my branch", "--project", "p", "--dry-run",
    )  # fmt: skip
    assert len(lines) == 1
    assert lines[0].startswith("gcloud compute tpus tpu-vm ssh tw --zone=z --worker=all --command=")
    assert lines[0].endswith(" --project=p")
    command = remote_command(lines[0])
    assert command.startswith(
        "set -e; if [ ! -d ~/twindiff/.git ]; then "
        "git clone -q https://github.com/twindiff/twindiff.git ~/twindiff; fi; "
        "cd ~/twindiff; git fetch -q origin 'my branch'; git checkout -q FETCH_HEAD; "
    )
    assert "; pip install -q -e '.[flax,tpu,data]'; " in command


# run.sh


def test_run_quotes_the_command_for_the_worker(fake):
    lines = fake.dry_run("run.sh", "tw", "z", "--dry-run", "--", *PROMPT_ARGV)
    assert lines == [
        "gcloud compute tpus tpu-vm ssh tw --zone=z --worker=all --command='cd ~/twindiff && "
        ". ~/twindiff-venv/bin/activate && python -m flaxdiff.dreambooth --instance_prompt "
        "'\\''a photo of sks dog'\\'''"
    ]
    command = remote_command(lines[0])
    assert command.startswith(SSH_PREFIX)
    assert shlex.split(command.removeprefix(SSH_PREFIX)) == PROMPT_ARGV


@pytest.mark.parametrize(
    "argv",
    [
        PROMPT_ARGV,
        ["python", "-c", "print('it''s')", "it's", 'say "hi"', "$HOME", "a;b && c", "", "~/x"],
        ["bash", "-c", "echo 'nested \"quotes\"' $0", "arg with\ttab", "--prompt=a 'b'"],
    ],
)
def test_run_printed_command_reads_back_as_the_same_argv(fake, argv):
    (line,) = fake.dry_run("run.sh", "tw", "z", "--dry-run", "--", *argv)
    assert shlex.split(remote_command(line).removeprefix(SSH_PREFIX)) == argv


def test_run_env_worker_and_dry_run_after_the_command(fake):
    (line,) = fake.dry_run(
        "run.sh", "tw", "z", "--env", "GREETING=hello world", "--env=A=1", "--worker", "0",
        "--", *PROMPT_ARGV, "--dry-run",
    )  # fmt: skip
    assert " --worker=0 " in line
    words = shlex.split(remote_command(line).removeprefix(SSH_PREFIX))
    assert words == ["env", "GREETING=hello world", "A=1", *PROMPT_ARGV]  # --dry-run was ours


def test_run_command_reaches_the_worker_word_for_word(fake):
    repo = fake.make_worker()
    argv = ["--instance_prompt", "a photo of sks dog", "it's", 'a"b', "$HOME", "", "x y  z"]
    code = (
        "import json, os, sys; "
        "json.dump([os.getcwd(), os.environ['GREETING'], sys.argv[1:]], open('seen.json', 'w'))"
    )
    result = fake.run(
        "run.sh", "tw", "z", "--env", "GREETING=hello 'world'", "--", sys.executable, "-c", code,
        *argv,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("+ gcloud compute tpus tpu-vm ssh tw ")
    cwd, greeting, seen = json.loads((repo / "seen.json").read_text())
    assert (Path(cwd), greeting, seen) == (repo, "hello 'world'", argv)


def test_run_detach_returns_and_logs_on_the_worker(fake):
    repo = fake.make_worker()
    code = "import time; time.sleep(3); print('trained', flush=True)"
    (line,) = fake.dry_run("run.sh", "tw", "z", "--detach", "--dry-run", "--", "python", "-c", code)
    assert remote_command(line).endswith(
        "{ nohup python -c 'import time; time.sleep(3); print('\\''trained'\\'', flush=True)' "
        ">> twindiff-run.log 2>&1 < /dev/null & }"
    )
    result = fake.run("run.sh", "tw", "z", "--detach", "--", sys.executable, "-c", code, timeout=30)
    assert result.returncode == 0, result.stderr
    log = repo / "twindiff-run.log"
    # Had ssh (the fake's pipes) waited for the command, its output would be in the log already.
    assert not log.exists() or "trained" not in log.read_text()
    for _ in range(200):
        if log.exists() and "trained" in log.read_text():
            break
        time.sleep(0.05)
    assert log.read_text() == "trained\n"


# copy.sh, delete.sh


def test_copy_from_worker_0(fake):
    lines = fake.dry_run("copy.sh", "tw", "europe-west4-a", "dreambooth-dog", "--dry-run")
    assert lines == [
        "gcloud compute tpus tpu-vm scp --recurse --worker=0 tw:twindiff/dreambooth-dog . "
        "--zone=europe-west4-a"
    ]
    lines = fake.dry_run("copy.sh", "--dry-run", "tw", "z", "/mnt/runs/my run", "./out")
    assert lines == [
        "gcloud compute tpus tpu-vm scp --recurse --worker=0 'tw:/mnt/runs/my run' ./out --zone=z"
    ]
    assert shlex.split(lines[0])[7] == "tw:/mnt/runs/my run"


def test_delete_is_quiet(fake):
    assert fake.dry_run("delete.sh", "tw", "europe-west4-a", "--dry-run", "--project", "p") == [
        "gcloud compute tpus tpu-vm delete tw --zone=europe-west4-a --quiet --project=p"
    ]


# What runs is what --dry-run prints.

SAMPLES = [
    ("create.sh", ["tw", "z", "v4-32", "--spot", "--project", "p"]),
    ("setup.sh", ["tw", "z"]),
    ("setup.sh", ["tw", "z", "--repo", "https://example.com/r.git"]),
    ("run.sh", ["tw", "z", "--env", "A=b c", "--", *PROMPT_ARGV]),
    ("copy.sh", ["tw", "z", "out dir", "local"]),
    ("delete.sh", ["tw", "z"]),
]


@pytest.mark.parametrize(("script", "args"), SAMPLES)
def test_the_commands_run_are_those_printed(fake, script, args):
    printed = [shlex.split(line) for line in fake.dry_run(script, *args, "--dry-run")]
    if script == "setup.sh" and "--repo" not in args and not (ROOT / ".git").exists():
        pytest.skip("packing needs a git checkout")
    result = fake.run(script, *args)
    assert result.returncode == 0, result.stderr
    assert fake.gcloud_calls() == [argv[1:] for argv in printed if argv[0] == "gcloud"]
    assert [shlex.split(line[2:]) for line in result.stderr.splitlines()] == printed
    assert list(fake.tmp.iterdir()) == []  # setup.sh's tarball is removed


# Usage


BAD_USAGE = [
    ("create.sh", []),
    ("create.sh", ["tw", "z"]),
    ("create.sh", ["tw", "z", "v3-8", "extra"]),
    ("create.sh", ["tw", "z", "tpu-v3"]),
    ("create.sh", ["tw", "z", "v7x-8"]),  # no default runtime: --version needed
    ("create.sh", ["tw", "z", "v3-8", "--spot", "--preemptible"]),
    ("create.sh", ["tw", "z", "v3-8", "--version"]),
    ("create.sh", ["tw", "z", "v3-8", "--bogus"]),
    ("setup.sh", ["tw"]),
    ("setup.sh", ["tw", "z", "--ref", "main"]),
    ("setup.sh", ["tw", "z", "--python", "python3"]),
    ("setup.sh", ["tw", "z", "--worker", "first"]),
    ("run.sh", ["tw", "z"]),
    ("run.sh", ["tw", "z", "--"]),
    ("run.sh", ["tw", "z", "--env", "1A=b", "--", "true"]),
    ("run.sh", ["tw", "z", "--bogus", "--", "true"]),
    ("copy.sh", ["tw", "z"]),
    ("copy.sh", ["tw", "z", "gs://bucket/out"]),
    ("copy.sh", ["tw", "z", "out", "--worker", "all"]),
    ("delete.sh", ["tw"]),
    ("delete.sh", ["tw", "z", "more"]),
    ("delete.sh", ["--project"]),
]


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize(("script", "args"), BAD_USAGE)
def test_bad_usage_exits_2_with_one_line(fake, script, args, dry_run):
    result = fake.run(script, *args, *(["--dry-run"] if dry_run else []))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"tpu/{script}: ")
    assert not fake.log.exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(fake, script):
    assert os.access(TPU / script, os.X_OK)
    for flag in ("-h", "--help"):
        result = fake.run(script, flag)
        assert result.returncode == 0
        assert result.stdout.startswith(f"usage: tpu/{script} ")
        assert "--dry-run" in result.stdout
    assert not fake.log.exists()


def test_shellcheck_is_clean():
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    files = sorted(str(p.relative_to(ROOT)) for p in TPU.glob("*.sh"))
    result = subprocess.run([exe, "-x", *files], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
