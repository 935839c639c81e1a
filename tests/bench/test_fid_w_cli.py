"""Issue 24 item 23: `python -m cfgengine.bench.study full --estimate` (now studies.fid_w) without scikit-learn ended
in a traceback; it is one line naming the extra that installs it."""
from __future__ import annotations

import sys

from cfgengine.bench.studies import fid_w as study


def test_estimate_without_scikit_learn_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn → ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert study.main(["full", "--estimate"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m cfgengine.bench.studies.fid_w: error: ")
    assert "pip install 'cfgengine[data]'" in err
