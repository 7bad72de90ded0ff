"""`mule demo --quick` end to end on the tiny random model: every output file is produced."""

import json

from mule.cli import main
from mule.demo import DEMO_METHODS


def test_demo_quick_produces_every_output(tiny_model, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", f"model={tiny_model}", f"output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "mule demo finished in" in printed and "| base |" in printed
    for name in ("report.md", "results.csv", "results.json", "radar.png"):
        assert (out / name).is_file(), name
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["base", "ensemble", "oracle", *DEMO_METHODS]
    assert {"ga", "sft", "duet"} <= set(DEMO_METHODS) and DEMO_METHODS[0] == "bitopk"
    assert (out / "prepared" / "model" / "model.safetensors").is_file()
    report = (out / "report.md").read_text()
    assert "Target preparation was used" in report
    assert "## Time" in report and "| bitopk |" in report.split("## Time")[1]


def test_the_demo_centres_the_top_k_distillation_methods_only():
    from mule.demo import DemoConfig, demo_grid

    methods = {m.name: m.unlearn["method"] for m in demo_grid(DemoConfig(), "/prepared").methods}
    assert methods["bitopk"] == {"name": "bitopk", "center": True} and methods["duet"]["center"] is True
    assert all("center" not in methods[m] for m in ("sft", "ga"))
    every = {m.name: m.unlearn["method"] for m in demo_grid(DemoConfig(methods=["npo", "bitopk_duet_loss"]), "/p").methods}
    assert "center" not in every["npo"] and every["bitopk_duet_loss"]["center"] is True
    plain = demo_grid(DemoConfig(center=False), "/prepared").methods
    assert all("center" not in m.unlearn["method"] for m in plain)
