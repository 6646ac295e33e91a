"""Configuration: defaults, overrides, and errors that name the broken key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from milter.cli import main
from milter.config import DEFAULT_MODEL, PolicyConfig, load_config, nameserver, parse_config
from milter.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "milter.example.toml"


def test_defaults_need_no_file() -> None:
    cfg = load_config(None)
    assert cfg.model.path == DEFAULT_MODEL
    assert cfg.server.listen.startswith("127.0.0.1:")
    assert cfg.store.url.startswith("sqlite:")


def test_example_config_is_valid() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.policy.protected_domains == ("example.com",)
    assert cfg.policy.domains[0].action_override == "tag"
    assert cfg.auth.enabled and cfg.policy.dmarc_fail_action == "tag"
    assert cfg.auth.trusted_arc_sealers == ()
    assert (cfg.policy.bulk.enabled, cfg.policy.bulk.action) == (True, "accept")
    assert cfg.policy.domains[0].bulk_action == "tag"


def test_trusted_arc_sealers_are_normalised_and_default_to_none() -> None:
    cfg = parse_config({"auth": {"trusted_arc_sealers": [" Lists.Example.ORG. ", "google.com"]}})
    assert cfg.auth.trusted_arc_sealers == ("lists.example.org", "google.com")
    assert parse_config({}).auth.trusted_arc_sealers == ()


def test_nameserver_entries() -> None:
    cfg = parse_config({"auth": {"nameservers": ["192.0.2.1", "127.0.0.1:5353", "[::1]:5300", "::1"]}})
    assert [nameserver(n) for n in cfg.auth.nameservers] == [
        ("192.0.2.1", 53), ("127.0.0.1", 5353), ("::1", 5300), ("::1", 53)
    ]


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"policy": {"spam": {"quarantine": 7}}}, "policy.spam.quarantine"),
        ({"policy": {"spam": {"quarantin": 0.5}}}, "policy.spam.quarantin"),
        ({"policy": {"on_error": "drop"}}, "policy.on_error"),
        ({"policy": {"lists": {"deny_ips": ["10.0.0.0/8", "nonsense"]}}}, "policy.lists.deny_ips[1]"),
        ({"server": {"listen": "localhost"}}, "server.listen"),
        ({"server": {"workers": "two"}}, "server.workers"),
        ({"server": {"prepare_max_jobs": -1}}, "server.prepare_max_jobs"),
        ({"server": {"mode": "sideways"}}, "server.mode"),
        ({"server": {"xforward_hosts": ["127.0.0.1", "localhost"]}}, "server.xforward_hosts[1]"),
        ({"store": {"retention_days": -1}}, "store.retention_days"),
        # 0 made `quarantine purge` delete every held message, even one quarantined a second ago
        ({"store": {"retention_days": 0}}, "store.retention_days"),
        ({"store": {"retention_days": 36_501}}, "store.retention_days"),  # the cutoff date overflowed
        ({"serverr": {}}, "serverr"),
        ({"policy": {"domain": [{"spam": {"tag": 0.1}}]}}, "policy.domain[0].domain"),
        ({"policy": {"dmarc_fail_action": "reject"}}, "policy.dmarc_fail_action"),
        ({"auth": {"timeout": 0}}, "auth.timeout"),
        ({"policy": {"internal_networks": ["10.0.0.0/8", "lan"]}}, "policy.internal_networks[1]"),
        ({"auth": {"nameservers": ["127.0.0.1:5353", "dns.example"]}}, "auth.nameservers[1]"),
        ({"auth": {"nameservers": ["127.0.0.1:99999"]}}, "auth.nameservers[0]"),
        ({"auth": {"enabled": "yes"}}, "auth.enabled"),
        ({"auth": {"dns_cache_entries": -1}}, "auth.dns_cache_entries"),
        ({"auth": {"dns_cache_entries": 10**9}}, "auth.dns_cache_entries"),
        ({"auth": {"dns_cache_entries": 1.5}}, "auth.dns_cache_entries"),
        ({"auth": {"trusted_arc_sealers": "lists.example.org"}}, "auth.trusted_arc_sealers"),
        ({"auth": {"trusted_arc_sealers": ["lists.example.org", 7]}}, "auth.trusted_arc_sealers"),
        ({"auth": {"trusted_arc_sealers": ["lists.test", "*.google.com"]}}, "auth.trusted_arc_sealers[1]"),
        ({"auth": {"trusted_arc_sealers": ["192.0.2.1"]}}, "auth.trusted_arc_sealers[0]"),
        ({"auth": {"trusted_arc_sealers": ["localhost"]}}, "auth.trusted_arc_sealers[0]"),
        ({"policy": {"bulk": {"action": "reject"}}}, "policy.bulk.action"),
        ({"policy": {"bulk": {"enabled": "yes"}}}, "policy.bulk.enabled"),
        ({"policy": {"bulk": {"actions": "tag"}}}, "policy.bulk.actions"),
        ({"policy": {"bulk": "tag"}}, "policy.bulk"),
        ({"policy": {"domain": [{"domain": "a.test", "bulk_action": "no"}]}}, "policy.domain[0].bulk_action"),
        ({"model": {"provider": "gpu"}}, "model.provider"),
        ({"model": {"provider": "CUDA"}}, "model.provider"),
        ({"model": {"provider": 1}}, "model.provider"),
        ({"model": {"gpu_batch_size": 0}}, "model.gpu_batch_size"),
        ({"model": {"gpu_batch_size": 65_537}}, "model.gpu_batch_size"),
        ({"model": {"gpu_batch_size": 256.0}}, "model.gpu_batch_size"),
        ({"model": {"gpu_batch_wait_ms": -1}}, "model.gpu_batch_wait_ms"),
        ({"model": {"gpu_batch_wait_ms": 5000}}, "model.gpu_batch_wait_ms"),
        ({"model": {"gpu_batch_wait": 5}}, "model.gpu_batch_wait"),
        # what `milter serve` cannot run with: before, these passed check-config and then stopped the
        # gateway with a traceback (batch_max), refused every client (max_sessions) or timed out at once
        ({"server": {"workers": 0}}, "server.workers"),
        ({"server": {"batch_max": 0}}, "server.batch_max"),
        ({"server": {"max_sessions": 0}}, "server.max_sessions"),
        ({"server": {"command_timeout": 0}}, "server.command_timeout"),
        ({"server": {"data_timeout": 0.0}}, "server.data_timeout"),
        ({"server": {"downstream_timeout": 0}}, "server.downstream_timeout"),
        ({"server": {"hostname": ""}}, "server.hostname"),
        ({"auth": {"timeout": 30}}, "auth.timeout"),  # not under server.scan_timeout (30 s)
        ({"policy": {"domain": [{"domain": "a.test"}, {"domain": "b.test"}, {"domain": "A.test."}]}},
         "policy.domain[2].domain"),  # the same domain twice: which rule applies would be a guess
        ({"auth": {"timeout": 5}, "server": {"scan_timeout": 4}}, "auth.timeout"),
        ({"server": {"hostname": "mx 1.example.com"}}, "server.hostname"),
        # a ladder whose stricter step sits under a laxer one: that laxer step could never apply
        ({"policy": {"spam": {"tag": 0.9, "quarantine": 0.5}}}, "policy.spam.quarantine"),
        ({"policy": {"bec": {"quarantine": 0.9, "reject": 0.8}}}, "policy.bec.reject"),
        ({"policy": {"spam": {"tag": 0.9, "quarantine": False, "reject": 0.5}}}, "policy.spam.reject"),
        ({"policy": {"domain": [{"domain": "a.test", "spam": {"tag": 0.7, "quarantine": 0.6}}]}},
         "policy.domain[0].spam.quarantine"),
        # entries that would silently match nothing: the policy compares names and whole addresses
        ({"policy": {"domain": [{"domain": ""}]}}, "policy.domain[0].domain"),
        ({"policy": {"domain": [{"domain": "@example.com"}]}}, "policy.domain[0].domain"),
        ({"policy": {"protected_domains": ["example.com", "*.example.org"]}}, "policy.protected_domains[1]"),
        ({"policy": {"lists": {"allow_domains": ["*@partner.test"]}}}, "policy.lists.allow_domains[0]"),
        ({"policy": {"lists": {"deny_domains": ["a.test", "evil .test"]}}}, "policy.lists.deny_domains[1]"),
        ({"policy": {"lists": {"allow_senders": ["jane"]}}}, "policy.lists.allow_senders[0]"),
        ({"policy": {"lists": {"deny_senders": ["<bad@evil.test>"]}}}, "policy.lists.deny_senders[0]"),
        ({"policy": {"lists": {"deny_senders": ["*@evil.test"]}}}, "policy.lists.deny_senders[0]"),
        ({"policy": {"lists": {"allow_senders": ["jane@"]}}}, "policy.lists.allow_senders[0]"),
        # a domain part with no A-label form: mail never carries it, so the entry could match nobody
        ({"policy": {"lists": {"deny_senders": ["bad@bü_cher.test"]}}}, "policy.lists.deny_senders[0]"),
        ({"reputation": {"skip_domains": ["google.com", "https://a.test"]}}, "reputation.skip_domains[1]"),
        # checked before start: a worker that cannot bind it died, and was restarted every second
        ({"server": {"metrics_listen": "127.0.0.1"}}, "server.metrics_listen"),
        ({"server": {"metrics_listen": "127.0.0.1:99999"}}, "server.metrics_listen"),
    ],
)
def test_errors_name_the_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.key == key
    assert repr(key) in str(info.value)


def test_what_the_new_checks_let_through() -> None:
    """The checks that catch swapped cuts and entries that match nothing leave every usable setting:
    equal cuts, a step switched off, a bare TLD, names in any script, blank entries (skipped by the
    policy), a domain rule written with capitals and a final dot (normalised as the policy compares)."""
    cfg = parse_config({
        "policy": {
            "spam": {"tag": 0.9, "quarantine": 0.9},
            "bec": {"tag": False, "quarantine": 0.6, "reject": 0.99},
            "protected_domains": ["Example.COM.", "bücher.example", ""],
            "lists": {"deny_domains": ["xyz", "mail_relay.example.net"],
                      "allow_senders": [" Jane.Doe+news@Example.com ", "\"odd@name\"@example.org",
                                        "jane@bücher.example"]},
            "domain": [{"domain": " Lab.Example.com. ", "spam": {"quarantine": 0.4}}],
        },
        "server": {"max_message_size": 0, "scan_timeout": 0, "workers": 1, "hostname": "localhost"},
    })
    assert cfg.policy.domains[0].domain == "lab.example.com"
    assert cfg.policy.bec is not None and cfg.policy.bec.tag is None
    assert cfg.server.max_message_size == 0 and cfg.server.workers == 1


def test_check_config_refuses_what_serve_cannot_run_with(tmp_path: Path) -> None:
    """check-config is the admin's dry run: a value that stops `milter serve` must fail it, naming the key."""
    bad = tmp_path / "bad.toml"
    for text, key in (
        ("[server]\nbatch_max = 0\n", "server.batch_max"),
        ("[server]\nworkers = 0\n", "server.workers"),
        ('[policy.lists]\nallow_domains = ["@partner.test"]\n', "policy.lists.allow_domains[0]"),
    ):
        bad.write_text(text)
        result = CliRunner().invoke(main, ["check-config", "--config", str(bad)])
        assert result.exit_code == 1 and repr(key) in result.output, (text, result.output)


def test_model_provider_and_gpu_batching_keys() -> None:
    default = load_config(None).model
    assert (default.provider, default.gpu_batch_size, default.gpu_batch_wait_ms) == ("auto", 512, 5.0)
    for provider in ("auto", "cpu", "cuda"):
        assert parse_config({"model": {"provider": provider}}).model.provider == provider
    model = parse_config({"model": {"gpu_batch_size": 4096, "gpu_batch_wait_ms": 0}}).model
    assert (model.gpu_batch_size, model.gpu_batch_wait_ms) == (4096, 0.0)


def test_relative_model_path_is_relative_to_the_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "etc" / "milter.toml"
    cfg_file.parent.mkdir()
    cfg_file.write_text('[model]\npath = "models/m.onnx"\n')
    assert load_config(cfg_file).model.path == tmp_path / "etc" / "models" / "m.onnx"


def test_check_config_command(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nmax_sessions = 1.5\n")
    result = CliRunner().invoke(main, ["check-config", "--config", str(bad)])
    assert result.exit_code == 1
    assert "server.max_sessions" in result.output
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    result = CliRunner().invoke(main, ["check-config", "--config", str(broken)])
    assert result.exit_code == 1 and "not valid TOML" in result.output
    ok = CliRunner().invoke(main, ["check-config", "--config", str(EXAMPLE)])
    assert ok.exit_code == 0, ok.output
    # what only the policy checks, when built, is checked too (it would stop `milter serve`)
    for text, key in (
        ('[policy]\nabused_tlds = ["not a tld"]\n', "policy.abused_tlds"),
        ('[policy.brands]\nCVS = ["cvs.com"]\n', "policy.brands.CVS"),
        ('[policy]\ninternal_networks = ["10.0.0.0/33"]\n', "policy.internal_networks"),
    ):
        bad.write_text(text)
        result = CliRunner().invoke(main, ["check-config", "--config", str(bad)])
        assert result.exit_code == 1 and key in result.output, (text, result.output)


def test_bulk_settings(tmp_path: Path) -> None:
    assert (PolicyConfig().bulk.enabled, PolicyConfig().bulk.action) == (True, "accept")  # on by default
    good = tmp_path / "bulk.toml"
    good.write_text(
        '[policy.bulk]\nenabled = false\naction = "quarantine"\n\n'
        '[[policy.domain]]\ndomain = "Lab.Example.com"\nbulk_action = "tag"\n'
    )
    cfg = load_config(good).policy
    assert (cfg.bulk.enabled, cfg.bulk.action) == (False, "quarantine")
    assert (cfg.domains[0].domain, cfg.domains[0].bulk_action, cfg.domains[0].action_override) == (
        "lab.example.com", "tag", None)
    assert CliRunner().invoke(main, ["check-config", "--config", str(good)]).exit_code == 0
    bad = tmp_path / "bad-bulk.toml"
    bad.write_text('[policy.bulk]\naction = "reject"\n')
    result = CliRunner().invoke(main, ["check-config", "--config", str(bad)])
    assert result.exit_code == 1
    why = "config key 'policy.bulk.action': must be 'accept', 'tag' or 'quarantine', got 'reject'"
    assert why in result.output


def test_dns_cache_size_reaches_the_gateway_resolver() -> None:
    from milter.auth.cache import CachingResolver
    from milter.gateway.auth import build_sender_auth

    cfg = parse_config({"auth": {"dns_cache_entries": 250, "nameservers": ["127.0.0.1:5353"]}})
    assert cfg.auth.dns_cache_entries == 250
    auth = build_sender_auth(cfg.auth, "gw.test")
    assert auth is not None and isinstance(auth.resolver, CachingResolver)
    assert auth.resolver.max_entries == 250
    assert parse_config({}).auth.dns_cache_entries == 10_000


def test_the_example_blocklists_are_valid_when_uncommented() -> None:
    """docs/milter.example.toml shows Spamhaus zones commented out (no list is asked by default)."""
    assert load_config(EXAMPLE).reputation.zones == ()
    text = EXAMPLE.read_text()
    start = text.index("[reputation]")
    end = text.index("\n\n", start)
    block = "\n".join(
        line[2:] if line.startswith("# ") and not line.startswith("# DNS") else line
        for line in text[start:end].splitlines()
    )
    zones = parse_config(tomllib.loads(block)).reputation.zones
    assert [(z.name, z.kind, z.verdict) for z in zones] == [
        ("zen.spamhaus.org", "ip", "spam"), ("dbl.spamhaus.org", "domain", "spam"),
        ("dbl.spamhaus.org", "domain", "bec"),
    ]
    assert dict(zones[2].codes) == {"127.0.1.4": "phish domain"}


def test_the_example_brands_table_parses_once_uncommented() -> None:
    """docs/milter.example.toml shows [policy.brands] commented out (the default list applies)."""
    assert load_config(EXAMPLE).policy.brands == PolicyConfig().brands
    text = EXAMPLE.read_text()
    start = text.index("# [policy.brands]")
    end = text.index("\n\n", start)
    block = "\n".join(line.removeprefix("# ") for line in text[start:end].splitlines())
    got = dict(parse_config(tomllib.loads(block)).policy.brands)
    assert got["Medicare"] == ("cms.gov", "hhs.gov", "ssa.gov")
    assert got["Consumer Cellular"] == ()


@pytest.mark.parametrize("text", ["", "off", " off "])
def test_metrics_listen_is_turned_off_with_an_empty_value_or_off(text: str) -> None:
    """TOML has no null: "" and "off" (as --metrics-listen takes) turn the endpoint off."""
    assert parse_config({"server": {"metrics_listen": text}}).server.metrics_listen is None
    kept = parse_config({"server": {"metrics_listen": "127.0.0.1:9930"}}).server.metrics_listen
    assert kept == "127.0.0.1:9930"
