"""Bad input to the CLI commands: one line on stderr naming the file and the key or line, exit
status 2, no traceback, none of pyFAI's detector list."""
from __future__ import annotations

import numpy as np
import pytest

from service.cli import main

PONI = "Detector: Pilatus1M\nDistance: {dist}\nPoni1: 0.08\nPoni2: 0.09\nRot1: 0\nRot2: 0\nRot3: 0\nWavelength: 1e-10\n"


@pytest.fixture
def files(tmp_path):
    np.save(tmp_path / "frames.npy", np.zeros((2, 16, 16), np.float32))
    np.savez(tmp_path / "profiles.npz", q=np.linspace(1, 5, 50), I=np.ones((3, 50)))
    (tmp_path / "banana.poni").write_text(PONI.format(dist="banana"))
    (tmp_path / "broken.yaml").write_text("peaks:\n  - {name: a, center: 3\n")
    return tmp_path


@pytest.mark.parametrize("argv, expected", [
    ("integrate {d}/frames.npy --poni {d}/banana.poni -o {d}/o.npz",
     "scatterflow integrate: error: {d}/banana.poni, line 2: Distance = 'banana' is not a number"),
    ("integrate {d}/frames.npy --poni {d}/frames.npy -o {d}/o.npz",
     "scatterflow integrate: error: {d}/frames.npy: not a PONI file (binary; a PONI file is text, 'Distance: 0.1' lines)"),
    ("calibrate {d}/frames.npy --calibrant AgBh --detector Pilatus9M --wavelength 1e-10 --distance-guess 1.6 "
     "-o {d}/o.poni",
     "scatterflow calibrate: error: unknown pyFAI detector 'Pilatus9M'; close names: pilatus6m, pilatus2m, "
     "pilatus1m, pilatus_6m"),
    ("fit {d}/profiles.npz --peaks {d}/broken.yaml -o {d}/f.csv",
     "scatterflow fit: {d}/broken.yaml: not valid YAML (line 3, column 1: expected ',' or '}}', but got '<stream end>')"),
    ("fit {d}/frames.npy --peaks {d}/broken.yaml -o {d}/f.csv",
     "scatterflow fit: {d}/frames.npy: a single array, not an .npz archive with arrays q and I (and sigma, time, "
     "seq_num), as `scatterflow integrate` writes"),
    ("serve --config {d}/broken.yaml",
     "scatterflow: configuration {d}/broken.yaml: not valid YAML (line 3, column 1: expected ',' or '}}', but got "
     "'<stream end>')"),
])
def test_bad_input_is_one_line_naming_file_and_key(files, capsys, argv, expected):
    assert main(argv.format(d=files).split()) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [expected.format(d=files)]
