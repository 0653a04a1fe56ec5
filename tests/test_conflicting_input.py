"""Bad input as a new user gives it: flags that would be ignored or conflict, sizes the tiny model cannot read, folders
passed to the wrong script. Each fails before any data is built, naming the flags, the values and the fix."""

import pytest
from test_run_checks import train

from coconut import linear_probe


@pytest.fixture(scope="module")
def cot_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cot")
    train(folder, "--method", "cot", "--max_steps", "1")
    return folder / "out"


def test_the_linear_probe_refuses_what_it_would_get_wrong(cot_run, tmp_path):
    """Two models of one name used to keep only the second; a CoT model gave an empty table and exit code 0; an
    `--output_dir` that is a file raised a bare FileExistsError."""
    with pytest.raises(ValueError, match="`--models` names 'a' twice .*the second would replace the first"):
        linear_probe.main(["--models", f"a={cot_run}", f"a={tmp_path}"])
    with pytest.raises(ValueError, match="has no thoughts to probe: it was trained with `method`='cot'"):
        linear_probe.main(["--models", f"cot={cot_run}", "--output_dir", str(tmp_path / "probe")])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="`output_dir`='.*a_file' cannot be written"):
        linear_probe.main(["--models", f"cot={cot_run}", "--output_dir", str(tmp_path / "a_file")])
    assert not (tmp_path / "probe" / "data").exists()  # refused before any question is rendered
