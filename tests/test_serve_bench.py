"""bench.serve_bench's arguments: a malformed --server is one usage line, before any server starts."""

from __future__ import annotations

import pytest

from bench.serve_bench import main


@pytest.mark.parametrize("spec", ["new", "=.", "new={missing}"])
def test_a_bad_server_spec_is_one_usage_line(spec, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--server", spec.format(missing=tmp_path / "missing")])
    assert exc.value.code == 2
    assert "--server takes name=checkout-directory" in capsys.readouterr().err
