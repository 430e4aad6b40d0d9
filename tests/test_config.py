import dataclasses
import re
from pathlib import Path

import pytest

from patchcore_milvus.config import Config, load_config, option_names
from patchcore_milvus.errors import ConfigError


def test_defaults_are_the_documented_configuration():
    config = load_config()
    assert config.backbone == "efficientnet_lite0"
    assert config.image_size == 384 and config.center_crop is None
    assert config.coreset_ratio == 0.01 and config.projection_dim == 128
    assert config.index_type == "HNSW" and config.effective_index_params == {"M": 16, "efConstruction": 200}
    assert config.border == "zeros"  # anomalib's 3x3 average; README, "Beside anomalib"
    assert config.uri.endswith(".db")


def test_flags_win_over_the_file(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("coreset_ratio: 0.2\nindex_type: IVF_FLAT\nindex_params: {nlist: 64}\n")
    config = load_config(path, coreset_ratio=0.05, backbone=None)
    assert config.coreset_ratio == 0.05
    assert config.index_type == "IVF_FLAT"
    assert config.effective_index_params == {"nlist": 64}
    assert config.effective_search_params == {"nprobe": 32}


def test_unknown_key_is_named_with_the_valid_ones(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("corset_ratio: 0.2\n")
    with pytest.raises(ConfigError, match="corset_ratio") as info:
        load_config(path)
    assert all(name in str(info.value) for name in option_names())
    assert f"in {path}: 'corset_ratio' (did you mean 'coreset_ratio'?)" in str(info.value)


def test_scoring_commands_offer_no_seed():
    """The seed drives the projection, the coreset and the hold-out split: ingest's, not query's."""
    from click.testing import CliRunner

    from patchcore_milvus.cli import main

    for command in ("query", "evaluate"):
        assert "--seed" not in CliRunner().invoke(main, [command, "--help"]).output
    assert "--seed" in CliRunner().invoke(main, ["ingest", "--help"]).output


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("coreset_ratio", 0, "coreset_ratio must be in"),
        ("coreset_ratio", 1.5, "coreset_ratio must be in"),
        ("image_size", -3, "image_size must be from 32 to 2048"),
        ("image_size", 100000, "image_size must be from 32 to 2048"),
        ("target_dim", 10**7, "target_dim must be from 1 to 8192"),
        ("image_size", "big", "image_size must be int"),
        ("reweight", "yes", "reweight must be bool"),
        ("backbone", "resnet18", "backbone must be one of"),
        ("index_type", "FLAT", "index_type must be one of"),
        ("uri", "banks.sqlite", "ending in .db"),
        ("center_crop", 512, "center_crop must lie between"),
        ("keep_versions", 0, "keep_versions must be at least 1"),
        ("retry_seconds", -1, "retry_seconds must not be negative"),
        ("index_timeout", 0, "index_timeout must be positive"),
    ],
)
def test_impossible_values_are_refused(key, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Config(**{key: value})


def test_server_uri_accepted_and_credentials_come_from_environment(monkeypatch):
    monkeypatch.setenv("MILVUS_TOKEN", "root:secret")
    config = Config(uri="http://milvus.plant:19530")
    assert config.credentials == {"token": "root:secret"}
    assert "secret" not in str(config.to_dict())
    monkeypatch.delenv("MILVUS_TOKEN")
    monkeypatch.setenv("MILVUS_USER", "station7")
    monkeypatch.setenv("MILVUS_PASSWORD", "secret")
    assert config.credentials == {"user": "station7", "password": "secret"}


def test_tls_options_map_to_pymilvus():
    from patchcore_milvus.milvus.connection import tls_options

    assert tls_options(Config()) == {}
    assert tls_options(Config(tls_ca_cert="ca.pem")) == {}  # a Lite file: nothing to encrypt
    one_way = Config(uri="https://milvus.plant:19530", tls_ca_cert="ca.pem", tls_server_name="milvus.plant")
    assert tls_options(one_way) == {"server_pem_path": "ca.pem", "server_name": "milvus.plant", "secure": True}
    mutual = Config(
        uri="https://milvus.plant:19530",
        tls_ca_cert="ca.pem",
        tls_client_cert="client.pem",
        tls_client_key="client.key",
    )
    assert tls_options(mutual) == {
        "ca_pem_path": "ca.pem",
        "client_pem_path": "client.pem",
        "client_key_path": "client.key",
        "secure": True,
    }
    with pytest.raises(ConfigError, match="go together"):
        Config(tls_ca_cert="ca.pem", tls_client_cert="client.pem")


def test_exponent_numbers_yaml_reads_as_text_are_numbers_where_a_number_is_meant(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("milvus_timeout: 1.0e2\nimage_threshold: 2e1\n")
    config = load_config(path)
    assert config.milvus_timeout == 100.0 and config.image_threshold == 20.0
    path.write_text("seed: 1e3\n")
    with pytest.raises(ConfigError, match="seed must be int"):
        load_config(path)


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_the_shipped_station_config_is_valid():
    config = load_config(Path(__file__).parents[1] / "deploy" / "station.yaml")
    assert config.uri.startswith("http://") and config.retry_seconds > 0


def test_the_readme_documents_every_option_and_every_option_has_a_flag():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    documented = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            documented |= set(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    assert documented == set(option_names())
    from click.testing import CliRunner

    from patchcore_milvus.cli import main

    shown = CliRunner().invoke(main, ["config", "show", "--help"]).output
    for option in dataclasses.fields(Config):
        flag = option.metadata["flag"] or "--" + option.name.replace("_", "-")
        assert flag.split("/")[0] in shown, option.name
