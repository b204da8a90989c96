"""``rigl_ds.host_memory``: the mmap threshold its phases leave behind."""

from rigl_ds import host_memory


def test_after_its_phases_the_threshold_is_the_environments_where_it_sets_one(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert host_memory._threshold_after() == 1 << 20
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "not a number")
    assert host_memory._threshold_after() == 32 << 20
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert host_memory._threshold_after() == 32 << 20
    with host_memory.freed_buffers_return_to_the_os(True):
        pass  # sets and restores through glibc's mallopt where there is one; never raises
