"""Kill tests (issue 15 causes 1 and 2): the functions of benchmarks/kill_tests.py with fewer
kills (the benchmark runs 20 of each; see its docstring)."""

import pytest
from kill_tests import kill_compile, kill_group_resume, kill_train_parent

from accelc.zoo import export_zoo


@pytest.mark.cause(1)
@pytest.mark.slow
def test_kill_during_compile_leaves_old_new_or_nothing(tmp_path):
    export_zoo("vgg", tmp_path / "vgg.onnx")
    work = tmp_path / "w"
    work.mkdir()
    s = kill_compile(tmp_path / "vgg.onnx", work, kills=8)
    print("kill compile", s)
    assert s["partial"] == 0 and s["replace_lost"] == 0 and s["leftovers"] == 0, s
    assert s["complete"] >= 1 and s["absent"] >= 1, s  # kills landed before and after the end
    assert s["replace_old"] + s["replace_new"] == 4, s


@pytest.mark.cause(2)
@pytest.mark.slow
def test_kill_train_parent_alone_takes_the_worker_with_it(small_art, tmp_path):
    s = kill_train_parent(small_art, tmp_path, kills=3)
    print("kill parent", s)
    assert s["kills"] >= 2 and s["worker_gone_2s"] == s["kills"], s


@pytest.mark.cause(3)
@pytest.mark.slow
def test_kill_whole_group_then_resume_is_exact(small_art, tmp_path):
    s = kill_group_resume(small_art, tmp_path, kills=2)
    print("kill group", s)
    assert s["resumed_exact"] == s["kills"] == 2 and s["leftovers"] == 0, s
