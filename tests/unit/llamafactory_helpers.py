"""What the LLaMA-Factory tests share: the copied assets and YAML builders.
(The assets make relative paths resolve as in a LLaMA-Factory checkout.)
(Imported by name: pytest puts tests/unit on sys.path for its test modules; the
``workspace`` fixture is in tests/unit/conftest.py.)"""

from __future__ import annotations

from pathlib import Path

import yaml

ASSETS = Path(__file__).resolve().parents[1] / "assets"
LF = ASSETS / "llamafactory"


def example(rel: str, tmp_path: Path, model: Path | str, **extra: object) -> Path:
    """The example with the model replaced by ``model`` and output_dir by a tmp dir."""
    data = yaml.safe_load((LF / "examples" / rel).read_text())
    data["model_name_or_path"] = str(model)
    if "output_dir" in data:
        data["output_dir"] = str(tmp_path / "saves" / "run")
    path = tmp_path / Path(rel).name
    path.write_text(yaml.safe_dump(data | extra))
    return path


def lf(tmp_path: Path, **extra: object) -> Path:
    base: dict[str, object] = {"model_name_or_path": "/m", "stage": "sft", "dataset": "d"}
    path = tmp_path / "lf.yaml"
    path.write_text(yaml.safe_dump(base | extra))
    return path
