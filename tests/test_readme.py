"""The README's examples run as written, and its two set-up commands exist."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_python_examples_run(capsys: object) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})


def test_setup_commands_lead_the_readme() -> None:
    text = README.read_text()
    first_block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert first_block is not None
    lines = [ln.split("#")[0].strip() for ln in first_block.group(1).splitlines() if ln.strip()]
    assert lines == ["pip install . && theta-store demo", "bash .ci/run"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pytest" in ci and "cargo test" in ci


def _use_it_blocks() -> list[str]:
    section = README.read_text().split("\n## Use it\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)[:2]


def test_use_it_commands_run_as_written(tmp_path: Path) -> None:
    """The README's "Use it" flow, as a new user types it, gives a collaborator real files."""
    import os
    import subprocess
    import sys

    import numpy as np

    import theta_store

    first, then = _use_it_blocks()
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "GIT_CONFIG_GLOBAL": str(tmp_path / "gitconfig"),
        "URL": f"file://{tmp_path / 'remote.git'}",
        # the `theta-store` of this interpreter, not a version manager's shim
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    (tmp_path / "gitconfig").write_text("[init]\n\tdefaultBranch = main\n")

    def run(cwd: Path, *args: str) -> None:
        r = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, check=False)
        assert r.returncode == 0, f"{args} in {cwd} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"

    project = tmp_path / "my-project"
    run(tmp_path, "git", "init", "-q", "--bare", "remote.git")
    run(tmp_path, "git", "init", "-q", "my-project")
    run(project, "git", "remote", "add", "origin", env["URL"])
    rng = np.random.default_rng(0)
    model = {"w": rng.standard_normal((512, 256)).astype(np.float32), "b": np.zeros(256, np.float32)}
    theta_store.save_safetensors(str(project / "model.safetensors"), model)
    v1 = (project / "model.safetensors").read_bytes()

    run(tmp_path, "bash", "-euc", first)
    assert (tmp_path / "other" / "model.safetensors").read_bytes() == v1
    assert len(list((tmp_path / "remote.git" / "refs" / "theta").iterdir())) == 1  # the push carried v1

    model["b"] = model["b"] + np.float32(1)  # the fine-tune
    theta_store.save_safetensors(str(project / "model.safetensors"), model)
    v2 = (project / "model.safetensors").read_bytes()
    run(project, "bash", "-euc", then)
    assert (project / "model.safetensors").read_bytes() == v1
    run(tmp_path / "other", "git", "pull", "-q")
    assert (tmp_path / "other" / "model.safetensors").read_bytes() == v2  # v2 reached the collaborator
