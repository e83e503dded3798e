"""deploy/'s Compose file, CUDA image and systemd unit agree with quadrant: their commands parse
with quadrant's own CLI, paths and the model store line up with the images, and the unit passes
`systemd-analyze verify` where systemd is installed. No image build, no daemon."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from quadrant.cli import build_parser

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _dockerfile(name: str) -> tuple[str, list[str], str]:
    """(FROM image, CMD arguments, QUADRANT_HOME) of a Dockerfile."""
    text = (DEPLOY / name).read_text()
    image = re.search(r"^FROM (\S+)", text, re.M).group(1)  # type: ignore[union-attr]
    cmd = eval(re.search(r"^CMD (\[.*\])", text, re.M).group(1))  # noqa: S307 - a JSON list in our own file
    home = re.search(r"QUADRANT_HOME=(\S+)", text).group(1)  # type: ignore[union-attr]
    return image, cmd, home


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_images_run_commands_quadrant_accepts(name):
    image, cmd, home = _dockerfile(name)
    args = build_parser().parse_args(cmd)
    assert args.command == "serve" and args.host == "0.0.0.0" and args.port == 8000
    if name.endswith("cuda"):
        assert args.device == "cuda" and "2.11" in image  # the GPU machines' torch
    assert home.startswith("/home/quadrant/")


def test_compose_services_build_from_the_repo():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"quadrant", "quadrant-gpu"} and "models" in compose["volumes"]
    for name, service in services.items():
        context = (DEPLOY / service["build"]["context"]).resolve()
        assert context == ROOT and (context / service["build"]["dockerfile"]).is_file()
        _, cmd, home = _dockerfile(Path(service["build"]["dockerfile"]).name)
        assert service["command"] == cmd  # the same server the image would start
        assert f"models:{home}" in service["volumes"]
        assert service["ports"] == ["127.0.0.1:8000:8000"]
        assert "/health" in " ".join(service["healthcheck"]["test"])
    assert services["quadrant-gpu"]["profiles"] == ["gpu"] and "profiles" not in services["quadrant"]


def test_systemd_unit():
    unit = (DEPLOY / "systemd" / "quadrant.service").read_text()
    exec_start = re.search(r"^ExecStart=(\S+) (.*)$", unit, re.M)
    assert exec_start is not None
    args = build_parser().parse_args(exec_start.group(2).split())
    assert args.command == "serve" and args.host == "127.0.0.1"
    assert "QUADRANT_HOME=/var/lib/quadrant" in unit and "ReadWritePaths=/var/lib/quadrant" in unit


def test_systemd_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (DEPLOY / "systemd" / "quadrant.service").read_text()
    # The binary lives in a venv this machine does not have: verify the unit's directives with /bin/true.
    copy = tmp_path / "quadrant.service"
    copy.write_text(re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", unit, flags=re.M))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
