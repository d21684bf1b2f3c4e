"""The seed-port tests' guard (``test_seed_port.seed_text``): without the seed notebook beside the
checkout they skip loudly, naming the path, and under ``CI=true`` they fail instead (issue 17)."""

from __future__ import annotations

import pytest
import test_seed_port


def test_a_missing_seed_skips_loudly_with_its_path(tmp_path, monkeypatch):
    missing = tmp_path / "shared" / "seed" / "000_11b433e77477edad.txt"
    monkeypatch.setattr(test_seed_port, "SEED_FILE", missing)
    monkeypatch.delenv("CI", raising=False)
    with (
        pytest.warns(UserWarning, match="seed notebook not found"),
        pytest.raises(pytest.skip.Exception) as skip,
    ):
        test_seed_port.seed_text()
    assert str(skip.value).startswith("SKIPPED LOUDLY: seed notebook not found at ")
    assert str(missing) in str(skip.value)


@pytest.mark.parametrize("ci", ["true", "TRUE"])
def test_a_missing_seed_fails_under_ci(tmp_path, monkeypatch, ci):
    monkeypatch.setattr(test_seed_port, "SEED_FILE", tmp_path / "absent.txt")
    monkeypatch.setenv("CI", ci)
    # caught as BaseException: a skip raised here instead must fail this test, not skip it
    with pytest.raises(BaseException, match="absent.txt") as stopped:
        test_seed_port.seed_text()
    assert stopped.type is pytest.fail.Exception


def test_a_present_seed_is_read(tmp_path, monkeypatch):
    seed = tmp_path / "seed.txt"
    seed.write_text("héllo\n.. code:: ipython3\n", encoding="utf-8")
    monkeypatch.setattr(test_seed_port, "SEED_FILE", seed)
    monkeypatch.setenv("CI", "true")
    assert test_seed_port.seed_text() == "héllo\n.. code:: ipython3\n"
