"""`data prepare --out` replaces a prepared data set as a whole: files the user put into it were deleted with it."""

import pytest

from meshwright.data.prepare import prepare
from meshwright.errors import ConfigError


def test_prepared_dir_with_foreign_files_is_left_alone(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello world\n" * 20)
    out = tmp_path / "data"
    prepare([src], out, progress=False)
    notes = out / "NOTES.md"  # the user's own file, beside the prepared data
    notes.write_text("where this corpus came from\n")
    with pytest.raises(ConfigError) as err:
        prepare([src], out, progress=False)
    assert "\n" not in str(err.value) and "NOTES.md" in str(err.value)
    assert notes.read_text() == "where this corpus came from\n"
    notes.unlink()
    assert prepare([src], out, progress=False) == out  # only meshwright's own files: replaced as before
