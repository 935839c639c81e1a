"""Thread selection (cfgengine/threads.py): affinity, physical cores, and the documented overrides."""
from __future__ import annotations

import os

import pytest

from cfgengine import threads


@pytest.fixture
def no_overrides(monkeypatch):
    for name in threads.ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def test_selection_follows_the_affinity_mask_not_the_machine(monkeypatch, no_overrides):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert threads.available_cpus() == {3}
    assert threads.intra_op_threads() == 1


def test_hyperthread_siblings_count_as_one_core(monkeypatch, tmp_path, no_overrides):
    """CPUs 0 and 4 share a core, 1 is alone; the path lookup is redirected to a fake sysfs."""
    lists = {0: "0,4", 4: "0,4", 1: "1"}
    real_path = threads.Path

    def fake_path(text: str):
        for cpu, siblings in lists.items():
            if text == f"/sys/devices/system/cpu/cpu{cpu}/topology/core_cpus_list":
                file = tmp_path / f"cpu{cpu}"
                file.write_text(siblings + "\n")
                return file
        return real_path(text)
    monkeypatch.setattr(threads, "Path", fake_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 4}, raising=False)
    assert threads.physical_cores() == 2
    assert threads.physical_cores({0, 4}) == 1


def test_without_affinity_support_all_cpus_count(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert threads.available_cpus() == {0, 1, 2}


@pytest.mark.parametrize("env,want", [({"CFGENGINE_THREADS": "3"}, 3),
                                      ({"OMP_NUM_THREADS": "5"}, 5),
                                      ({"OMP_NUM_THREADS": "4,2"}, 4),
                                      ({"CFGENGINE_THREADS": "2", "OMP_NUM_THREADS": "7"}, 2)])
def test_overrides_win_in_order(monkeypatch, no_overrides, env, want):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert threads.intra_op_threads() == want


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_bad_override_is_a_clear_error(monkeypatch, no_overrides, value):
    monkeypatch.setenv("CFGENGINE_THREADS", value)
    with pytest.raises(ValueError, match="CFGENGINE_THREADS"):
        threads.intra_op_threads()
