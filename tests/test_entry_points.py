"""Every entry point (scripts/ and benchmarks/) answers --help from its own checkout: with another
checkout's packages first on the path (an editable install or PYTHONPATH pointing elsewhere, or none
installed), a script must still import this checkout's code, not fail or run someone else's."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import ROOT

PACKAGES = ("llm", "shared", "vqvae", "multimodal", "flow_matching", "judge")
ENTRY_POINTS = sorted(p for folder in ("scripts", "benchmarks", "benchmarks/gpu") for p in (ROOT / folder).glob("*.py")
                      if "__main__" in p.read_text())


def test_every_entry_point_answers_help_with_another_checkouts_packages_first(tmp_path):
    for name in PACKAGES:  # a decoy of each package, found before any installed one
        (tmp_path / "elsewhere" / name).mkdir(parents=True)
        (tmp_path / "elsewhere" / name / "__init__.py").write_text(f"raise ImportError('the decoy {name}')\n")
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path / "elsewhere"),
           "HOME": str(tmp_path)}

    def help_of(script: Path) -> tuple[Path, subprocess.CompletedProcess]:
        return script, subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env,
                                      capture_output=True, text=True, timeout=300)

    assert len(ENTRY_POINTS) >= 20
    with ThreadPoolExecutor(2) as pool:
        for script, proc in pool.map(help_of, ENTRY_POINTS):
            name = script.relative_to(ROOT)
            assert proc.returncode == 0, f"{name}: {proc.stderr.strip().splitlines()[-1:]}"
            assert "usage:" in proc.stdout, name
