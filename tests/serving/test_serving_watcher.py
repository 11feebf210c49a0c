"""Placement watcher on real kubelet-style symlink swaps."""

from __future__ import annotations

import json
import time
from pathlib import Path

from moeplace_serving.configdir import write_atomic
from moeplace_serving.metrics import ServingMetrics
from moeplace_serving.watcher import PlacementVersion, PlacementWatcher, ServingShape
from serving_helpers import tiny_placement

from placement import Placement

EXPECT = ServingShape(layers=3, experts=4, num_gpus=2)


def _files(placement: Placement, **extra: str) -> dict[str, str]:
    return {"placement.json": placement.to_json(), **extra}


def _watcher(directory: Path, errors: list[str] | None = None) -> PlacementWatcher:
    metrics = ServingMetrics("tiny", layers=3, experts=4)
    sink = errors if errors is not None else []
    return PlacementWatcher(
        directory, EXPECT, metrics=metrics, on_error=lambda _rev, why: sink.append(why)
    )


def test_hand_made_kubelet_layout_and_swap(tmp_path: Path) -> None:
    """The exact layout the kubelet makes, built by hand, then the ..data swap by rename."""
    first = tmp_path / "..2026_11_22_05_40_00.123456789"
    first.mkdir()
    (first / "placement.json").write_text(tiny_placement(1).to_json())
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "placement.json").symlink_to("..data/placement.json")
    watcher = _watcher(tmp_path)
    got = watcher.poll()
    assert got is not None and got.version == 1 and got.revision == first.name
    assert watcher.poll() is None  # unchanged target: nothing new

    second = tmp_path / "..2026_11_22_05_41_00.987654321"
    second.mkdir()
    (second / "placement.json").write_text(tiny_placement(2, shift=1).to_json())
    (tmp_path / "..data_tmp").symlink_to(second.name)
    (tmp_path / "..data_tmp").rename(tmp_path / "..data")
    got = watcher.poll()
    assert got is not None and got.version == 2
    assert got.placement.phy2log == tiny_placement(2, shift=1).phy2log


def test_writer_mimics_kubelet(tmp_path: Path) -> None:
    first = write_atomic(tmp_path, _files(tiny_placement(1)))
    assert first.name.startswith("..20") and str((tmp_path / "..data").readlink()) == first.name
    assert str((tmp_path / "placement.json").readlink()) == "..data/placement.json"
    second = write_atomic(tmp_path, _files(tiny_placement(2)))
    assert not first.exists() and str((tmp_path / "..data").readlink()) == second.name


def test_corrupt_file_keeps_last_good(tmp_path: Path) -> None:
    errors: list[str] = []
    watcher = _watcher(tmp_path, errors)
    write_atomic(tmp_path, _files(tiny_placement(1)))
    assert watcher.poll() is not None
    write_atomic(tmp_path, {"placement.json": tiny_placement(2).to_json()[:-20]})
    assert watcher.poll() is None
    latest = watcher.latest
    assert latest is not None and latest.version == 1
    assert "cannot parse placement.json" in errors[-1] and watcher.last_error == errors[-1]
    assert watcher.metrics is not None
    assert (
        watcher.metrics.registry.get_sample_value(
            "moe_placement_reloads_total", {"model": "tiny", "rank": "0", "result": "invalid"}
        )
        == 1.0
    )
    write_atomic(tmp_path, _files(tiny_placement(3)))
    got = watcher.poll()
    assert got is not None and got.version == 3 and watcher.last_error is None


def test_refusals_say_why(tmp_path: Path) -> None:
    errors: list[str] = []
    watcher = _watcher(tmp_path, errors)
    write_atomic(tmp_path, _files(tiny_placement(5)))
    assert watcher.poll() is not None

    missing = json.loads(tiny_placement(6).to_json())
    missing["phy2log"][1] = [0, 0, 1, 1, 2, 2]
    write_atomic(tmp_path, {"placement.json": json.dumps(missing)})
    watcher.poll()
    assert "experts [3] have no slot" in errors[-1]

    write_atomic(tmp_path, _files(tiny_placement(4, shift=1)))
    watcher.poll()
    assert "not newer" in errors[-1]

    write_atomic(tmp_path, _files(tiny_placement(7), hash="0123456789abcdef"))
    watcher.poll()
    assert "does not match" in errors[-1]

    wide = Placement.from_table(
        [[0, 1, 2, 3]] * 3, tiny_placement(1).model, num_gpus=4, strategy="x"
    )
    write_atomic(tmp_path, _files(wide, version="8"))
    watcher.poll()
    assert "serving has (3, 4, 2)" in errors[-1]

    unversioned = tiny_placement(1).model_copy(update={"metadata": {}})
    write_atomic(tmp_path, _files(unversioned))
    watcher.poll()
    assert "no integer version" in errors[-1]
    latest = watcher.latest
    assert latest is not None and latest.version == 5 and len(errors) == 5


def test_version_and_hash_keys(tmp_path: Path) -> None:
    watcher = _watcher(tmp_path)
    placement = tiny_placement(1)
    write_atomic(tmp_path, _files(placement, version="42", hash=placement.content_hash()))
    got = watcher.poll()
    assert got is not None and got.version == 42


def test_background_thread_picks_up_swaps(tmp_path: Path) -> None:
    seen: list[PlacementVersion] = []
    watcher = PlacementWatcher(tmp_path, EXPECT, poll_interval_s=0.01, on_update=seen.append)
    watcher.start()
    try:
        for version in (1, 2, 3):
            write_atomic(tmp_path, _files(tiny_placement(version, shift=version)))
            deadline = time.monotonic() + 5
            while (not seen or seen[-1].version != version) and time.monotonic() < deadline:
                time.sleep(0.005)
            assert seen[-1].version == version
    finally:
        watcher.stop()
    assert watcher.get(1) is not None and watcher.get(3) is not None


def test_same_tables_under_an_older_version_are_a_no_op(tmp_path: Path) -> None:
    errors: list[str] = []
    watcher = _watcher(tmp_path, errors)
    write_atomic(tmp_path, _files(tiny_placement(3)))
    assert watcher.poll() is not None
    write_atomic(tmp_path, _files(tiny_placement(1)))  # same tables, version reset
    assert watcher.poll() is None and not errors


def test_swap_during_read_is_retried(tmp_path: Path) -> None:
    """``..data`` names a directory that is gone (swapped and cleaned up mid-read): no refusal,
    the next poll reads whatever ``..data`` names then."""
    errors: list[str] = []
    watcher = _watcher(tmp_path, errors)
    (tmp_path / "..data").symlink_to("..2026_11_22_06_00_00.gone")
    (tmp_path / "placement.json").symlink_to("..data/placement.json")
    assert watcher.poll() is None and not errors
    gone = tmp_path / "..2026_11_22_06_00_00.gone"
    gone.mkdir()
    (gone / "placement.json").write_text(tiny_placement(1).to_json())
    got = watcher.poll()
    assert got is not None and got.version == 1 and not errors
