"""DistributionSettings: defaults, sources and their priority, filters, validation, resolved URLs."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from celery_services.core.service import STANDARD_EVENTS, STANDARD_METHODS
from celery_services.distribution import settings as settings_module
from celery_services.distribution.settings import DistributionSettings, LocalServiceInfo

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config"
CUSTOM_METHODS = [*STANDARD_METHODS, "publish_article"]
CUSTOM_EVENTS = [*STANDARD_EVENTS.values(), "article_published"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No CELERY_SERVICES_* variable from the caller, and a current directory without config/."""
    for name in list(os.environ):
        if name.startswith("CELERY_SERVICES_") and name != "CELERY_SERVICES_TEST_REDIS":
            monkeypatch.delenv(name)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def failing_fields(exc: ValidationError) -> set[str]:
    return {str(error["loc"][0]) for error in exc.errors()}


# -- defaults ---------------------------------------------------------------------------------------------


def test_defaults() -> None:
    s = DistributionSettings()
    assert s.key == "app"
    assert s.services == ["*"]
    assert s.remote_services == ["*"]
    assert s.remote_service_path is None
    assert s.remote_service_options == []
    assert s.distributed_methods == ["find", "get", "create", "update", "patch", "remove"]
    assert s.distributed_events == ["created", "updated", "patched", "removed"]
    assert s.publish_events is True
    assert s.authentication is False
    assert s.hooks is None
    assert s.timeout == 20.0
    assert s.heartbeat_interval == 5.0
    assert s.registry_ttl is None
    assert s.rescan_interval is None
    assert (s.broker_url, s.result_backend, s.registry_url) == (None, None, None)
    assert s.event_delivery == "broadcast"
    assert s.max_payload_bytes == 1_048_576
    assert s.extra_params == []
    assert s.event_context == []
    assert s.debug is False
    assert s.registry_prefix == "celery_services"
    assert s.events_exchange == "celery_services.events"


def test_default_lists_are_not_shared() -> None:
    first = DistributionSettings()
    first.distributed_methods.append("publish_article")
    assert isinstance(first.services, list)
    first.services.append("extra")
    second = DistributionSettings()
    assert second.distributed_methods == list(STANDARD_METHODS)
    assert second.services == ["*"]


def test_module_exports_the_settings_and_the_filter_descriptor() -> None:
    assert settings_module.__all__ == ["DistributionSettings", "LocalServiceInfo"]


def test_load_without_any_file_gives_defaults(clean_environment: Path) -> None:
    assert not (clean_environment / "config").exists()
    assert DistributionSettings.config_files() == []
    assert DistributionSettings.load() == DistributionSettings()


# -- sources and priority ---------------------------------------------------------------------------------


def test_load_reads_config_default_toml_of_the_current_directory(clean_environment: Path) -> None:
    write(clean_environment / "config" / "default.toml", '[distribution]\nkey = "from-file"\ndebug = true\n')
    loaded = DistributionSettings.load()
    assert loaded.key == "from-file"
    assert loaded.debug is True


def test_direct_construction_reads_no_file(clean_environment: Path) -> None:
    write(clean_environment / "config" / "default.toml", '[distribution]\nkey = "from-file"\n')
    assert DistributionSettings().key == "app"
    assert DistributionSettings.load().key == "from-file"
    # load() does not leave its files behind for later direct constructions
    assert DistributionSettings().key == "app"


def test_priority_kwargs_over_env_over_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = write(
        tmp_path / "base.toml",
        '[distribution]\nkey = "file-key"\ntimeout = 3.0\ndebug = true\nservices = ["file*"]\n',
    )
    monkeypatch.setenv("CELERY_SERVICES_KEY", "env-key")
    monkeypatch.setenv("CELERY_SERVICES_TIMEOUT", "7.5")
    monkeypatch.setenv("CELERY_SERVICES_BROKER_URL", "redis://env-host:6379/1")

    loaded = DistributionSettings.load(config, key="kwarg-key")

    assert loaded.key == "kwarg-key"  # kwargs beat env and file
    assert loaded.timeout == 7.5  # env beats file
    assert loaded.broker_url == "redis://env-host:6379/1"  # env only
    assert loaded.debug is True  # file only
    assert loaded.services == ["file*"]
    assert loaded.heartbeat_interval == 5.0  # default


def test_environment_specific_file(monkeypatch: pytest.MonkeyPatch, clean_environment: Path) -> None:
    config = clean_environment / "config"
    write(config / "default.toml", '[distribution]\nkey = "base"\ntimeout = 3.0\ndebug = true\n')
    write(config / "staging.toml", '[distribution]\nkey = "staging"\ntimeout = 4.0\n')
    monkeypatch.setenv("CELERY_SERVICES_ENV", "staging")
    monkeypatch.setenv("CELERY_SERVICES_TIMEOUT", "9")

    loaded = DistributionSettings.load()

    assert loaded.key == "staging"  # environment file beats base file
    assert loaded.debug is True  # base file still read
    assert loaded.timeout == 9.0  # env var beats environment file
    assert DistributionSettings.config_files() == [
        (config / "default.toml").resolve(),
        (config / "staging.toml").resolve(),
    ]


def test_environment_file_is_looked_up_beside_an_explicit_base_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    base = write(tmp_path / "elsewhere" / "main.toml", '[distribution]\nkey = "base"\n')
    write(tmp_path / "elsewhere" / "prod.toml", '[distribution]\nkey = "prod"\n')
    monkeypatch.setenv("CELERY_SERVICES_ENV", "prod")
    assert DistributionSettings.load(base).key == "prod"


def test_environment_file_without_base_file(monkeypatch: pytest.MonkeyPatch, clean_environment: Path) -> None:
    write(clean_environment / "config" / "ci.toml", '[distribution]\nkey = "ci"\n')
    monkeypatch.setenv("CELERY_SERVICES_ENV", "ci")
    assert DistributionSettings.load().key == "ci"


def test_missing_environment_file_is_an_error(
    monkeypatch: pytest.MonkeyPatch, clean_environment: Path
) -> None:
    write(clean_environment / "config" / "default.toml", "[distribution]\n")
    monkeypatch.setenv("CELERY_SERVICES_ENV", "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        DistributionSettings.load()


def test_environment_name_must_be_plain(monkeypatch: pytest.MonkeyPatch, clean_environment: Path) -> None:
    write(clean_environment / "config" / "default.toml", "[distribution]\n")
    monkeypatch.setenv("CELERY_SERVICES_ENV", "../default")
    with pytest.raises(ValueError, match="CELERY_SERVICES_ENV"):
        DistributionSettings.load()


def test_config_env_var_names_the_base_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write(tmp_path / "chosen.toml", '[distribution]\nkey = "chosen"\n')
    monkeypatch.setenv("CELERY_SERVICES_CONFIG", str(tmp_path / "chosen.toml"))
    assert DistributionSettings.load().key == "chosen"


def test_explicit_path_beats_config_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write(tmp_path / "by-env.toml", '[distribution]\nkey = "by-env"\n')
    explicit = write(tmp_path / "explicit.toml", '[distribution]\nkey = "explicit"\n')
    monkeypatch.setenv("CELERY_SERVICES_CONFIG", str(tmp_path / "by-env.toml"))
    assert DistributionSettings.load(str(explicit)).key == "explicit"


def test_missing_explicit_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape("missing.toml")):
        DistributionSettings.load(tmp_path / "missing.toml")
    monkeypatch.setenv("CELERY_SERVICES_CONFIG", str(tmp_path / "also-missing.toml"))
    with pytest.raises(FileNotFoundError, match=re.escape("also-missing.toml")):
        DistributionSettings.load()


def test_file_without_distribution_table_gives_defaults(tmp_path: Path) -> None:
    config = write(tmp_path / "other.toml", '[http]\nport = 8080\n[other]\nkey = "not-ours"\n')
    assert DistributionSettings.load(config) == DistributionSettings()


def test_distribution_must_be_a_table(tmp_path: Path) -> None:
    config = write(tmp_path / "bad.toml", 'distribution = "my-app"\n')
    with pytest.raises(ValueError, match=r"\[distribution\] must be a table"):
        DistributionSettings.load(config)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    config = write(tmp_path / "broken.toml", "[distribution\nkey = \n")
    with pytest.raises(ValueError, match=re.escape("broken.toml")):
        DistributionSettings.load(config)


def test_lists_from_environment_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_SERVICES_DISTRIBUTED_METHODS", '["find", "publish_article"]')
    monkeypatch.setenv("CELERY_SERVICES_DISTRIBUTED_EVENTS", '["article_published"]')
    monkeypatch.setenv("CELERY_SERVICES_SERVICES", "[]")
    monkeypatch.setenv("CELERY_SERVICES_REMOTE_SERVICES", '["my-app", "*/users"]')
    monkeypatch.setenv("CELERY_SERVICES_EXTRA_PARAMS", '["tenant"]')
    monkeypatch.setenv("CELERY_SERVICES_EVENT_DELIVERY", "group")
    monkeypatch.setenv("CELERY_SERVICES_AUTHENTICATION", "true")
    s = DistributionSettings()
    assert s.distributed_methods == ["find", "publish_article"]
    assert s.distributed_events == ["article_published"]
    assert s.services == []
    assert s.remote_services == ["my-app", "*/users"]
    assert s.extra_params == ["tenant"]
    assert s.event_delivery == "group"
    assert s.authentication is True


def test_a_single_glob_counts_as_a_list(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CELERY_SERVICES_SERVICES", "articles*")
    config = write(tmp_path / "c.toml", '[distribution]\nremote_services = "my-app"\n')
    s = DistributionSettings.load(config)
    assert s.services == ["articles*"]
    assert s.remote_services == ["my-app"]


def test_malformed_json_in_environment_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_SERVICES_DISTRIBUTED_METHODS", '["find"')
    with pytest.raises(SettingsError, match="distributed_methods"):
        DistributionSettings()


def test_other_models_and_test_variables_are_not_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_SERVICES_TEST_REDIS", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("CELERY_SERVICES_JWT_SECRET", "x")
    assert DistributionSettings().key == "app"


def test_an_unknown_variable_fails_naming_the_closest_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_SERVICES_TIMOUT", "3")
    with pytest.raises(ValueError, match=r"CELERY_SERVICES_TIMOUT; did you mean CELERY_SERVICES_TIMEOUT\?$"):
        DistributionSettings()
    monkeypatch.delenv("CELERY_SERVICES_TIMOUT")
    monkeypatch.setenv("CELERY_SERVICES_SOMETHING_ELSE", "x")
    with pytest.raises(ValueError, match=r"unknown setting variable CELERY_SERVICES_SOMETHING_ELSE$"):
        DistributionSettings()


def test_list_settings_read_commas_as_well_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_SERVICES_DISTRIBUTED_METHODS", "find, get")
    monkeypatch.setenv("CELERY_SERVICES_REMOTE_SERVICES", "my-app")
    monkeypatch.setenv("CELERY_SERVICES_SIGNING_KEYS", "a-secret-of-16-chars,another-secret-16chars")
    settings = DistributionSettings()
    assert settings.distributed_methods == ["find", "get"]
    assert settings.remote_services == ["my-app"]
    assert settings.signing_secrets("any") == [b"a-secret-of-16-chars", b"another-secret-16chars"]
    monkeypatch.setenv("CELERY_SERVICES_DISTRIBUTED_METHODS", '["find"]')
    assert DistributionSettings().distributed_methods == ["find"]


@pytest.mark.parametrize(
    ("setting", "url", "complaint"),
    [
        ("broker_url", "http://x", "scheme must be one of redis://"),
        ("broker_url", "redis://:pw@127.0.0.1:99999/0", "the port is not a number"),
        ("broker_url", "redis://127.0.0.1:6379/zero", "the database must be a number"),
        ("broker_url", "amqp://", "no host"),
        ("result_backend", "redis://127.0.0.1:abc/0", "the port is not a number"),
        ("registry_url", "redis+socket:///tmp/r.sock", "must be a Redis URL"),
        ("broker_url", "sentinel://127.0.0.1:26379;sentinel://h2:x/0", "the port is not a number"),
    ],
)
def test_urls_are_checked_naming_the_setting(setting: str, url: str, complaint: str) -> None:
    with pytest.raises(ValidationError) as caught:
        DistributionSettings(**{setting: url})
    message = str(caught.value)
    assert setting in message and complaint in message
    assert ":pw@" not in message


@pytest.mark.parametrize("setting", ["broker_url", "result_backend", "registry_url"])
def test_a_sentinel_url_needs_the_master_name(setting: str) -> None:
    url = "sentinel://:pw@127.0.0.1:26379;sentinel://127.0.0.1:26380/0"
    with pytest.raises(ValidationError) as caught:
        DistributionSettings(**{setting: url})
    message = str(caught.value)
    assert setting in message and "sentinel_master" in message
    assert ":pw@" not in message
    assert DistributionSettings(**{setting: url}, sentinel_master="mymaster").sentinel_master == "mymaster"


def test_sentinel_and_tls_settings_reach_celery() -> None:
    from celery_services.distribution.celery_app import make_celery

    sentinel = "sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380/0"
    conf = make_celery(DistributionSettings(broker_url=sentinel, sentinel_master="mymaster", timeout=3)).conf
    assert conf.broker_transport_options["master_name"] == "mymaster"
    assert conf.result_backend_transport_options["master_name"] == "mymaster"
    # The Sentinels are asked with explicit timeouts (Celery's result backend would give them none).
    assert conf.result_backend_transport_options["sentinel_kwargs"] == {
        "socket_timeout": 3,
        "socket_connect_timeout": 2.0,
    }
    tls = DistributionSettings(
        broker_url="rediss://127.0.0.1:6380/0",
        tls_ca_file="/ca.pem",
        tls_cert_file="/c.pem",
        tls_key_file="/k",
    )
    conf = make_celery(tls).conf
    expected = {
        "ssl_cert_reqs": "required",
        "ssl_ca_certs": "/ca.pem",
        "ssl_certfile": "/c.pem",
        "ssl_keyfile": "/k",
    }
    assert conf.broker_use_ssl == expected and conf.redis_backend_use_ssl == expected
    assert "master_name" not in conf.broker_transport_options


def test_celery_broker_variable_is_honoured_below_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
    assert DistributionSettings().resolved_broker_url() == "amqp://guest:guest@127.0.0.1:5672//"
    monkeypatch.setenv("CELERY_SERVICES_BROKER_URL", "redis://127.0.0.1:6379/3")
    assert DistributionSettings().resolved_broker_url() == "redis://127.0.0.1:6379/3"


# -- filters ----------------------------------------------------------------------------------------------


class Articles:
    path = "articles"


def test_services_callable_in_code() -> None:
    seen: list[Any] = []

    def only_articles(info: LocalServiceInfo) -> bool:
        seen.append(info)
        return info.path.startswith("articles") and isinstance(info.service, Articles)

    s = DistributionSettings.load(services=only_articles)
    articles = Articles()
    assert s.services is only_articles
    assert s.exposes(articles, "/articles/") is True  # a descriptor with the path, as feathers-distributed's
    assert s.exposes(object(), "articles") is False
    assert s.exposes(articles, "users") is False
    assert seen[0] == LocalServiceInfo("articles", articles)


def test_remote_services_callable_in_code() -> None:
    infos: list[Any] = []

    def from_my_app(info: Any) -> bool:
        infos.append(info)
        return bool(info["key"] == "my-app")

    s = DistributionSettings(key="gateway", remote_services=from_my_app)
    assert s.consumes("my-app", "articles", {"key": "my-app"}) is True
    assert s.consumes("other", "articles", {"key": "other"}) is False
    assert infos == [{"key": "my-app"}, {"key": "other"}]


def test_exposes_with_globs() -> None:
    s = DistributionSettings(services=["articles*", "api/users"])
    assert s.exposes(None, "articles")
    assert s.exposes(None, "articles-archive")
    assert s.exposes(None, "/articles/")
    assert s.exposes(None, "api/users")
    assert not s.exposes(None, "users")
    assert not s.exposes(None, "Articles")  # case-sensitive on every platform
    assert not DistributionSettings(services=[]).exposes(None, "articles")
    assert DistributionSettings().exposes(None, "anything/at/all")


@pytest.mark.parametrize(
    ("globs", "key", "path", "expected"),
    [
        (["my-app"], "my-app", "articles", True),
        (["my-app"], "my-app", "api/users", True),
        (["my-app"], "my-app-2", "articles", False),
        (["my-*"], "my-app-2", "articles", True),
        (["my-app/articles*"], "my-app", "articles", True),
        (["my-app/articles*"], "my-app", "articles-archive", True),
        (["my-app/articles*"], "my-app", "users", False),
        (["my-app/articles*"], "other", "articles", False),
        (["*/articles"], "other", "articles", True),
        (["*/articles"], "other", "articles-archive", False),
        (["articles"], "my-app", "articles", False),  # no "/": matched against the key only
        (["*"], "anyone", "anything", True),
        ([], "my-app", "articles", False),
        (["users", "my-app/articles"], "my-app", "articles", True),
    ],
)
def test_consumes_with_globs(globs: list[str], key: str, path: str, expected: bool) -> None:
    s = DistributionSettings(key="gateway", remote_services=globs)
    assert s.consumes(key, path, {"key": key, "path": path}) is expected


def test_never_consumes_its_own_key() -> None:
    s = DistributionSettings(key="my-app", remote_services=lambda info: True)
    assert s.consumes("my-app", "articles", {}) is False
    assert DistributionSettings(key="my-app").consumes("my-app", "articles", {}) is False


def test_local_path_alias() -> None:
    assert DistributionSettings().local_path({"path": "articles"}, "articles") == "articles"
    s = DistributionSettings(remote_service_path=lambda info: f"{info['key']}/{info['path']}")
    assert s.local_path({"key": "my-app", "path": "articles"}, "articles") == "my-app/articles"
    broken = DistributionSettings(remote_service_path=lambda info: "")
    with pytest.raises(ValueError, match="remote_service_path"):
        broken.local_path({}, "articles")


def test_service_options() -> None:
    assert DistributionSettings(remote_service_options=["model_name"]).service_options(None) == ["model_name"]
    s = DistributionSettings(remote_service_options=lambda service: ["id_field", service.path])
    assert s.service_options(Articles()) == ["id_field", "articles"]


def test_hooks_are_normalized_to_lists() -> None:
    def hook(context: Any) -> Any:
        return context

    s = DistributionSettings(hooks={"before": {"all": hook, "get": [hook, hook]}, "error": {"all": [hook]}})
    assert s.hooks == {"before": {"all": [hook], "get": [hook, hook]}, "error": {"all": [hook]}}


# -- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("key", "my app"),
        ("key", "my.app"),
        ("key", ""),
        ("timeout", -1),
        ("timeout", 0),
        ("heartbeat_interval", 0),
        ("rescan_interval", -5),
        ("event_delivery", "fanout"),
        ("max_payload_bytes", 0),
        ("registry_url", "http://127.0.0.1:6379"),
        ("registry_url", "amqp://guest@localhost//"),
        ("result_backend", "rpc://"),
        ("result_backend", "db+sqlite:///results.db"),
        ("broker_url", "localhost:6379"),
        ("distributed_methods", ["publish.article"]),
        ("distributed_methods", ["_private"]),
        ("distributed_events", ["article.published"]),
        ("services", 42),
        ("services", [""]),
        ("remote_services", ["my-app", ""]),
        ("remote_service_path", "my-app/articles"),
        ("hooks", {"around": {"all": []}}),
        ("hooks", {"before": {"all": ["not callable"]}}),
        ("registry_prefix", "has space"),
        ("extra_params", [""]),
    ],
)
def test_invalid_values_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        DistributionSettings(**{field: value})
    assert failing_fields(caught.value) == {field}


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('key = "bad key"', "key"),
        ("timeout = -1.0", "timeout"),
        ('event_delivery = "everyone"', "event_delivery"),
        ('registry_url = "memcached://127.0.0.1"', "registry_url"),
        ('distributed_methods = "find"', "distributed_methods"),
    ],
)
def test_invalid_values_in_a_file_name_the_field(tmp_path: Path, line: str, field: str) -> None:
    config = write(tmp_path / "bad.toml", f"[distribution]\n{line}\n")
    with pytest.raises(ValidationError) as caught:
        DistributionSettings.load(config)
    assert failing_fields(caught.value) == {field}


def test_invalid_value_in_environment_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_SERVICES_HEARTBEAT_INTERVAL", "-1")
    with pytest.raises(ValidationError) as caught:
        DistributionSettings()
    assert failing_fields(caught.value) == {"heartbeat_interval"}


def test_unknown_key_in_file_is_rejected(tmp_path: Path) -> None:
    config = write(tmp_path / "typo.toml", '[distribution]\nkey = "ok"\ntimout = 3\n')
    with pytest.raises(ValueError) as caught:
        DistributionSettings.load(config)
    # The file, the key and the closest valid key.
    assert str(caught.value) == f"{config}: unknown setting 'timout' in [distribution]; did you mean timeout?"


def test_unknown_keyword_is_rejected() -> None:
    typo: dict[str, Any] = {"remoteServices": ["my-app"]}
    with pytest.raises(ValidationError) as caught:
        DistributionSettings(**typo)
    assert failing_fields(caught.value) == {"remoteServices"}


def test_registry_ttl() -> None:
    assert DistributionSettings().resolved_registry_ttl() == 12.5
    assert DistributionSettings(heartbeat_interval=2).resolved_registry_ttl() == 5.0
    assert DistributionSettings(registry_ttl=30).resolved_registry_ttl() == 30.0
    with pytest.raises(ValidationError, match="registry_ttl"):
        DistributionSettings(heartbeat_interval=5, registry_ttl=5)


# -- resolved URLs ----------------------------------------------------------------------------------------

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("given", "broker", "backend", "registry"),
    [
        ({}, DEFAULT_REDIS, DEFAULT_REDIS, DEFAULT_REDIS),
        ({"broker_url": "redis://b:6379/2"}, "redis://b:6379/2", "redis://b:6379/2", "redis://b:6379/2"),
        ({"broker_url": "rediss://b:6380/0"}, "rediss://b:6380/0", "rediss://b:6380/0", "rediss://b:6380/0"),
        ({"broker_url": "amqp://guest@rabbit//"}, "amqp://guest@rabbit//", DEFAULT_REDIS, DEFAULT_REDIS),
        (
            {"broker_url": "amqp://guest@rabbit//", "result_backend": "redis://r:6379/3"},
            "amqp://guest@rabbit//",
            "redis://r:6379/3",
            "redis://r:6379/3",
        ),
        (
            {"broker_url": "redis://b/0", "result_backend": "redis://r/1", "registry_url": "redis://g/2"},
            "redis://b/0",
            "redis://r/1",
            "redis://g/2",
        ),
        (
            {"registry_url": "unix:///run/redis.sock?db=4"},
            DEFAULT_REDIS,
            DEFAULT_REDIS,
            "unix:///run/redis.sock?db=4",
        ),
        (
            {"result_backend": "redis+socket:///run/redis.sock?virtual_host=3"},
            DEFAULT_REDIS,
            "redis+socket:///run/redis.sock?virtual_host=3",
            "unix:///run/redis.sock?db=3",
        ),
    ],
)
def test_resolved_urls(given: dict[str, Any], broker: str, backend: str, registry: str) -> None:
    s = DistributionSettings(**given)
    assert s.resolved_broker_url() == broker
    assert s.resolved_result_backend() == backend
    assert s.resolved_registry_url() == registry


def test_broker_from_environment_is_the_default_backend_and_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_SERVICES_BROKER_URL", "redis://from-env:6379/5")
    s = DistributionSettings()
    assert s.resolved_result_backend() == "redis://from-env:6379/5"
    assert s.resolved_registry_url() == "redis://from-env:6379/5"


# -- shipped configuration files --------------------------------------------------------------------------


def test_shipped_default_toml_is_the_provider_example() -> None:
    s = DistributionSettings.load(SHIPPED / "default.toml")
    assert s.key == "my-app"
    assert s.services == ["articles*"]
    assert s.distributed_methods == CUSTOM_METHODS
    assert s.distributed_events == CUSTOM_EVENTS
    assert s.authentication is False
    assert s.exposes(None, "articles")
    assert not s.exposes(None, "users")


def test_shipped_gateway_toml_is_the_consumer_example() -> None:
    s = DistributionSettings.load(SHIPPED / "gateway.toml")
    assert s.key == "gateway"
    assert s.services == []
    assert s.remote_services == ["my-app"]
    assert s.authentication is False
    assert s.distributed_methods == CUSTOM_METHODS
    assert s.distributed_events == CUSTOM_EVENTS
    assert not s.exposes(None, "articles")
    assert s.consumes("my-app", "articles", {})
    assert not s.consumes("other-app", "articles", {})


def test_shipped_gateway_toml_works_as_an_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("CELERY_SERVICES_ENV", "gateway")
    s = DistributionSettings.load()
    assert (s.key, s.services, s.remote_services) == ("gateway", [], ["my-app"])


def test_shipped_default_toml_documents_every_file_option() -> None:
    text = (SHIPPED / "default.toml").read_text(encoding="utf-8")
    code_only = {"remote_service_path", "hooks"}
    for name in set(DistributionSettings.model_fields) - code_only:
        assert f"{name} = " in text, f"config/default.toml does not mention {name}"
