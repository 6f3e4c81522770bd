"""The README's options table is what ``python -m areal_a3po.options`` prints, from the config's help metadata."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from areal_a3po.config import A3POConfig, FallbackConfig
from areal_a3po.options import BEGIN, END, Option, markdown_table, plugin_options

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_table() -> str:
    text = README.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"README.md needs one {BEGIN!r} and one {END!r}"
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def test_the_readme_table_is_what_the_generator_prints():
    assert readme_table() == markdown_table(), (
        "README.md's options table differs from the config's help; paste the output of "
        "`python -m areal_a3po.options` between the OPTIONS markers"
    )


def test_every_plugin_key_is_listed_once():
    keys = [o.key for o in plugin_options()]
    expected = (
        ["actor.prox_logp_method"]
        + [f"actor.a3po.{f.name}" for f in fields(A3POConfig) if f.name != "fallback"]
        + [f"actor.a3po.fallback.{f.name}" for f in fields(FallbackConfig)]
        + ["actor.weight_update_group_timeout", "rollout.server_health_timeout"]
    )
    assert sorted(keys) == sorted(expected)
    assert len(keys) == len(set(keys))


def test_defaults_and_help_come_from_the_dataclasses():
    options = {o.key: o for o in plugin_options()}
    # The defaults as YAML writes them: None -> null, 300.0 -> 300.
    assert options["actor.a3po.anchor"].default == "paper"
    assert options["actor.a3po.fallback.threshold"].default == "null"
    assert options["actor.weight_update_group_timeout"].default == "300"
    assert options["rollout.server_health_timeout"].default == "120"
    help_of = {f.name: f.metadata["help"] for f in fields(FallbackConfig)}
    assert options["actor.a3po.fallback.patience"].help == help_of["patience"]
    # Only the plugin's part of prox_logp_method's help: AReaL's own text differs between versions.
    method = options["actor.prox_logp_method"]
    assert method.default == "recompute" and "'a3po'" in method.help and "'loglinear'" not in method.help


def test_cells_render_as_typed():
    table = markdown_table([Option("a.b", "null", "x | y, staleness_<S>, audit/*")])
    assert table.splitlines()[-1] == "| `a.b` | `null` | x \\| y, staleness_\\<S>, audit/\\* |"

