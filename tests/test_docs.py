"""The shipped documentation is generated from the one definition of each thing."""

from pathlib import Path

import privd.config
import vdsm_twisted.config
from vdsm_twisted.api import schema

ETC = Path(__file__).resolve().parent.parent / "etc"
DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_agent_key_is_documented_in_etc():
    sample = (ETC / "vdsm.conf").read_text()
    assert vdsm_twisted.config.SCHEMA.documented_in(sample) == []
    # and the sample parses to exactly the embedded defaults
    parsed = vdsm_twisted.config.SCHEMA.parse_text(sample)
    assert dict(parsed.values) == dict(vdsm_twisted.config.SCHEMA.defaults().values)


def test_every_privd_key_is_documented_in_etc():
    sample = (ETC / "privd.conf").read_text()
    assert privd.config.SCHEMA.documented_in(sample) == []


def test_sample_configs_are_current():
    for name, module in (("vdsm", vdsm_twisted.config), ("privd", privd.config)):
        text = (ETC / f"{name}.conf").read_text()
        for key in module.SCHEMA.keys:
            assert f"# {key.name} = {key.default}" in text, (name, key.name)


def test_api_reference_is_generated_from_the_schema():
    assert (DOCS / "API.md").read_text() == schema.render_markdown()


def test_unknown_and_bad_keys_are_refused():
    import pytest
    from vdsm_twisted.common.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        vdsm_twisted.config.SCHEMA.parse_text("[addresses]\nno_such_key = 1\n")
    with pytest.raises(ConfigError, match="management_port"):
        vdsm_twisted.config.SCHEMA.parse_text("[addresses]\nmanagement_port = 70000\n")
    with pytest.raises(ConfigError):
        vdsm_twisted.config.SCHEMA.parse_text("[addresses\n")
