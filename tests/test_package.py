"""The repo as one installed package: every module imports under one name from anywhere, no file touches the
interpreter's module search path, the scripts in slurm/ run as `python slurm/<script>.py`, and the launcher never loads torch."""
import subprocess
import sys
import tomllib

from conftest import REPO

# a fresh interpreter in which importing torch, vLLM or transformers raises, then the launcher's modules
_LAUNCHER_WITHOUT_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'vllm', 'transformers'):
            raise ImportError('the launcher must not import ' + name)
sys.meta_path.insert(0, Block())
import pipeline, slurm.sweep, slurm.plan
from slurm.spec import load_sweep
from slurm.stages import Plan
Plan(load_sweep('configs/sweep_default.yaml'), 'configs/sweep_default.yaml').classify()
"""


def python_files():
    return [p for p in REPO.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(REPO).parts)]


def test_every_top_level_module_and_package_is_installed():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(tool["py-modules"]) == sorted(p.stem for p in REPO.glob("*.py"))
    assert tool["packages"] == ["slurm"] and (REPO / "slurm" / "__init__.py").is_file()


# spelled in two halves so that a grep for it over the repo finds nothing, this file included
SEARCH_PATH = "sys." + "path"


def test_no_file_touches_the_module_search_path():
    offenders = [str(p.relative_to(REPO)) for p in python_files() if SEARCH_PATH in p.read_text()]
    assert offenders == []


def test_the_scripts_in_slurm_run_from_anywhere(tmp_path):
    for script in ("slurm/sweep.py", "slurm/plan.py"):
        result = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]


def test_the_launcher_plans_a_sweep_without_torch():
    result = subprocess.run([sys.executable, "-c", _LAUNCHER_WITHOUT_TORCH], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
