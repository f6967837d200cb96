"""The helpers the tests start processes with: a hung ``torchrun`` group is stopped, shows where it hung, and
is tried once more before the test fails."""

import pytest

from processes import run_torchrun


def test_a_hung_torchrun_group_is_stopped_with_its_stacks_and_tried_once_more(tmp_path):
    worker = tmp_path / "hang.py"
    worker.write_text("import time\n\ndef wait_forever():\n    while True:\n        time.sleep(1)\n\nwait_forever()\n")
    with pytest.warns(UserWarning, match="trying once more") as caught, \
            pytest.raises(AssertionError, match="hung twice") as failure:
        run_torchrun(2, [str(worker)], timeout=8)
    for report in (str(caught[0].message), str(failure.value)):
        assert "wait_forever" in report  # the fault handler's stack of a rank, from the hung attempt


def test_a_finished_group_is_returned_as_it_is_whatever_its_status(tmp_path):
    worker = tmp_path / "fail.py"
    worker.write_text("import os, sys\nprint('rank', os.environ['RANK'])\nsys.exit(3)\n")
    result = run_torchrun(2, [str(worker)], timeout=60)
    assert result.returncode != 0
    assert "rank 0" in result.stdout or "rank 1" in result.stdout

