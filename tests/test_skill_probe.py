"""The warm start's skill probe (cluster/skill_probe.py) on the tiny model."""
import pytest

from cluster.config import load_config
from cluster.skill_probe import _common_prefix, _last_end, _parse_box, gate_verdict, probe


def test_markers_are_found_from_the_end_and_calls_split_where_they_differ():
    assert _last_end([1, 2, 3, 1, 2, 4], [1, 2]) == 5
    with pytest.raises(ValueError, match="marker"):
        _last_end([1, 2, 3], [4])
    assert _common_prefix([[5, 6, 7, 1], [5, 6, 8, 1], [5, 6, 7, 2]]) == 2


def test_decoded_boxes_parse_only_when_they_are_four_numbers():
    assert _parse_box("0.5, 0.0, 1.0, 0.5") == [0.5, 0.0, 1.0, 0.5]
    assert _parse_box(" [0, 0.5, 0.5, 1") == [0.0, 0.5, 0.5, 1.0]
    assert _parse_box("0.5, 0.0, 1.0") is None and _parse_box("0.5, top, 1.0, 0.5") is None


def test_probe_reads_and_localizes_every_example_once(tiny_model_dir):
    config = load_config("zoom-curiosity", [])
    result = probe(tiny_model_dir, config, count=4)
    reading, localization = result["reading"], result["localization"]
    assert sum(sum(row.values()) for row in reading["confusion"].values()) == reading["count"] == 4
    patterns = {"horizontal", "vertical", "rising", "falling"}
    assert set(reading["confusion"]) <= patterns
    assert all(set(row) <= patterns for row in reading["confusion"].values())
    right = sum(row.get(gold, 0) for gold, row in reading["confusion"].items())
    assert reading["accuracy"] == right / 4
    after_zoom = result["reading_after_zoom"]  # the same reading inside zoom traces
    assert sum(sum(row.values()) for row in after_zoom["confusion"].values()) == after_zoom["count"] == 4
    assert set(after_zoom["confusion"]) <= patterns
    assert localization["count"] == 4 and localization["cells"] == 4
    quarters = {0.0, 0.25, 0.5, 0.75, 1.0}
    assert {localization["accuracy"], localization["holds_square"], localization["likeliest_cell_accuracy"]} <= quarters
    assert localization["accuracy"] <= localization["holds_square"]  # the named cell holds the square
    rows = localization["box_sampled"]  # only cells some example named; a row can sum to < 1 (other boxes)
    assert rows and set(rows) <= {0, 1, 2, 3}
    assert all(len(row) == 4 and all(0 < p < 1 for p in row) and sum(row) <= 1 + 1e-6 for row in rows.values())
    named = [row[cell] for cell, row in rows.items()]
    assert min(named) <= localization["named_box_sampled"] <= max(named)


def test_localization_is_not_probed_without_a_named_cell(tiny_model_dir):
    config = load_config("zoom-curiosity", ["data.synthetic.region_hint=false"])
    assert probe(tiny_model_dir, config, count=2)["localization"] is None


def test_the_command_takes_overrides_after_its_options(tiny_model_dir, tmp_path):
    from cluster.skill_probe import main

    out = tmp_path / "probe.json"
    result = main([tiny_model_dir, "--num", "1", "--json", str(out), "data.synthetic.region_hint=false"])
    assert result["localization"] is None and out.exists()


def probed(reading, box):
    return {"reading": {"accuracy": reading}, "localization": {"accuracy": box} if box is not None else None}


@pytest.mark.parametrize("reading, box, box_range, verdict, why", [
    (0.95, 0.45, (0.35, 0.65), "passed", "reads 95%, box 45%"),
    (0.9, 0.35, (0.35, 0.65), "passed", "reads 90%, box 35%"),  # both bounds inclusive
    (0.8, 0.45, (0.35, 0.65), "short", "reads 80% < 90%"),
    (0.8, 0.2, (0.35, 0.65), "short", "reads 80% < 90%; box 20% < 35%"),
    (1.0, 0.7, (0.35, 0.65), "overshot", "box 70% above 65%"),
    (0.5, 0.7, (0.35, 0.65), "overshot", "box 70% above 65%"),  # more SFT would not bring the box back
    (0.95, None, None, "passed", "reads 95%"),  # no box range: reading only
])
def test_the_skill_gate_passes_waits_or_gives_up(reading, box, box_range, verdict, why):
    assert gate_verdict(probed(reading, box), 0.9, box_range) == (verdict, why)
