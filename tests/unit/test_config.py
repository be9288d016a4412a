"""Pipeline config: the shipped YAML validates, errors are one line naming file/key/value, overrides, hashing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from operators.filters.row_filters import MinSideConfig
from operators.base import registry
from operators.image.decode import DecodeConfig
from pipelines.config import apply_overrides, config_hash, load, public_dict, redact, validate
from ground.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
BASIC = REPO / "conf" / "pipelines" / "basic.yaml"
DEMO = REPO / "conf" / "pipelines" / "demo.yaml"


def basic_dict() -> dict:
    return yaml.safe_load(BASIC.read_text())


def write(tmp_path: Path, data: dict, name: str = "pipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def config_error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        load(path, overrides)
    message = str(exc.value)
    assert "\n" not in message, message
    assert message.startswith(str(path)), message
    return message


@pytest.mark.parametrize("path", [BASIC, DEMO], ids=["basic", "demo"])
def test_shipped_configs_validate_with_every_operator(path):
    cfg = load(path)
    raw = yaml.safe_load(path.read_text())
    assert cfg.name == raw["name"]
    specs = cfg.operator_specs()
    assert [name for name, _ in specs] == [next(iter(op)) for op in raw["operators"]]
    name, decode = specs[0]
    assert name == "decode" and isinstance(decode, DecodeConfig)
    assert cfg.ray.address is None


def test_basic_yaml_values_reach_the_operator_configs():
    specs = dict(load(BASIC).operator_specs())
    assert isinstance(specs["min_side"], MinSideConfig) and specs["min_side"].min == 64
    assert specs["file_bytes"].max == 20_000_000
    assert specs["image_format"].allowed == ["jpeg", "png", "webp"]
    assert dict(load(DEMO).operator_specs())["decode"].resize_max_side == 384


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(outptu={"path": "x"}), "unknown key 'outptu'"),
    (lambda d: d["output"].update(compresion="zstd"), "unknown key 'output.compresion'"),
    (lambda d: d["input"].update(storage={"anon": True}), "unknown key 'input.storage'"),
    (lambda d: d["operators"][1]["min_side"].update(mni=3), "unknown key 'operators[1].min_side.mni'"),
    (lambda d: d["operators"][1]["min_side"].update(min=-1), "operators[1].min_side.min=-1"),
    (lambda d: d["operators"][0]["decode"].update(quality="high"), "operators[0].decode.quality='high'"),
    (lambda d: d["input"].update(format="tfrecord"), "input.format='tfrecord'"),
    (lambda d: d["output"].update(compression="lz5"), "output.compression='lz5'"),
    (lambda d: d["ray"].update(no_progress_timeout_s=0), "ray.no_progress_timeout_s=0"),
    (lambda d: d.pop("output"), "missing key 'output'"),
    (lambda d: d["input"].pop("format"), "missing key 'input.format'"),
    (lambda d: d["operators"][1].update(min_side=None), "missing key 'operators[1].min_side.min'"),
    (lambda d: d["operators"].append({"sharpness": {"min": 1}}), "unknown operator 'sharpness'"),
    (lambda d: d["operators"][3]["file_bytes"].update(min=10**9),
     "min (1000000000) is greater than max (20000000)"),
    (lambda d: d["operators"][0]["decode"].update(resources={"min_actors": 3, "max_actors": 2}),
     "min_actors (3) is greater than max_actors (2)"),
], ids=["top-level", "nested", "input", "operator-key", "operator-value", "operator-type", "literal",
        "output-literal", "ray", "missing-section", "missing-nested", "operator-missing", "unknown-operator",
        "operator-range", "actor-range"])
def test_bad_config_is_one_line_naming_file_key_and_value(tmp_path, mutate, expected):
    data = basic_dict()
    mutate(data)
    message = config_error(write(tmp_path, data))
    assert expected in message


def test_unknown_operator_lists_the_known_ones(tmp_path):
    data = basic_dict()
    data["operators"].insert(2, {"min_sides": {"min": 3}})
    message = config_error(write(tmp_path, data))
    assert "operators[2]: unknown operator 'min_sides'" in message
    assert "min_side" in message.split("known:")[1]


def test_an_operator_entry_must_name_exactly_one_operator_without_dumping_the_config(tmp_path):
    data = basic_dict()
    data["input"]["storage_options"] = {"key": "AKIAEXAMPLE", "secret": "hunter2"}
    data["operators"][1]["max_aspect_ratio"] = {"max": 3.0}  # two operators in one entry
    message = config_error(write(tmp_path, data))
    assert "operators[1] must be a mapping with exactly one operator name" in message
    assert "hunter2" not in message and "AKIAEXAMPLE" not in message


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ninput:\n  format: webdataset\n   paths: [a]\noutput: {path: o}\n")
    message = config_error(path)
    assert "line 4" in message and "invalid YAML" in message


def test_missing_file_and_non_mapping_documents(tmp_path):
    message = config_error(tmp_path / "nope.yaml")
    assert "cannot read config" in message
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert "top level must be a mapping" in config_error(path)


def test_overrides_are_parsed_as_yaml():
    data = apply_overrides(basic_dict(), [
        'input.paths=["s3://bucket/wds/{00000..00099}.tar", "s3://other/*.tar"]',
        "operators.1.min_side.min=128",
        "operators.0.decode.resize_max_side=512",
        "output.path=s3://bucket/curated",
        "output.rejected_image_bytes=true",
        "input.storage_options={anon: true, endpoint_url: 'http://127.0.0.1:9000'}",
        "ray.address=ray://head:10001",
        "ray.num_cpus=8",
        "name=nightly-2024.06",
    ])
    cfg = validate(data)
    assert cfg.input.paths == ["s3://bucket/wds/{00000..00099}.tar", "s3://other/*.tar"]
    specs = cfg.operator_specs()
    assert specs[1][1].min == 128 and specs[0][1].resize_max_side == 512
    assert specs[0][1].max_pixels == 89478485  # sibling keys survive a nested override
    assert cfg.output.path == "s3://bucket/curated" and cfg.output.rejected_image_bytes is True
    assert cfg.input.storage_options == {"anon": True, "endpoint_url": "http://127.0.0.1:9000"}
    assert cfg.ray.address == "ray://head:10001" and cfg.ray.num_cpus == 8
    assert cfg.name == "nightly-2024.06"


def test_overrides_create_missing_mappings_and_leave_the_input_alone():
    original = basic_dict()
    before = copy.deepcopy(original)
    data = apply_overrides(original, ["ray.object_store_memory_mb=512", "input.read_concurrency=4",
                                      "output.compression_level="])
    assert original == before
    assert data["ray"] == {"address": None, "object_store_memory_mb": 512}
    assert data["input"]["read_concurrency"] == 4
    assert data["output"]["compression_level"] == ""
    assert apply_overrides({"name": "x"}, ["ray.address=auto"])["ray"] == {"address": "auto"}


def test_a_single_path_string_becomes_a_list():
    cfg = load(BASIC, ["input.paths=/data/one.tar"])
    assert cfg.input.paths == ["/data/one.tar"]


@pytest.mark.parametrize("override, expected", [
    ("operators.1.min_side.min", "expected dotted.key=VALUE"),
    ("operators.9.min_side.min=1", "'9' is not an index of operators"),
    ("operators.first.min_side.min=1", "'first' is not an index of operators"),
    ("name.sub=1", "name is not a mapping"),
    ("input.paths=[a, b", "value '[a, b' is not valid YAML"),
])
def test_bad_overrides_are_config_errors(override, expected):
    with pytest.raises(ConfigError) as exc:
        apply_overrides(basic_dict(), [override])
    assert expected in str(exc.value) and "\n" not in str(exc.value)


def test_override_values_are_validated_and_named():
    message = config_error(BASIC, ["operators.1.min_side.min=-5"])
    assert "operators[1].min_side.min=-5" in message
    message = config_error(BASIC, ["output.compression_level=high"])
    assert "output.compression_level='high'" in message


def test_redact_hides_credentials_everywhere_and_keeps_the_rest():
    secret_opts = {"key": "AKIAEXAMPLE", "secret": "s3cr3t", "token": "hf_abc", "anon": False,
                   "endpoint_url": "http://minio:9000", "client_kwargs": {"aws_session_token": "FwoGZXIvYXdzEXAMPLE"}}
    cfg = validate({**basic_dict(),
                    "input": {**basic_dict()["input"], "storage_options": secret_opts},
                    "output": {"path": "s3://b/out", "storage_options": {"password": "pa55word", "Secret": "x"}}})
    public = public_dict(cfg)
    text = repr(public)
    for value in ("AKIAEXAMPLE", "s3cr3t", "hf_abc", "FwoGZXIvYXdzEXAMPLE", "pa55word"):
        assert value not in text
    assert public["input"]["storage_options"]["key"] == "***"
    assert public["input"]["storage_options"]["client_kwargs"]["aws_session_token"] == "***"
    assert public["input"]["storage_options"]["endpoint_url"] == "http://minio:9000"
    assert public["input"]["storage_options"]["anon"] is False
    assert public["output"]["storage_options"] == {"password": "***", "Secret": "***"}
    assert public["output"]["path"] == "s3://b/out"
    # The config object itself still holds the real credentials for the readers.
    assert cfg.input.storage_options["secret"] == "s3cr3t"
    assert redact({"token": None, "list": [{"key": "k"}]}) == {"token": None, "list": [{"key": "***"}]}


def test_config_hash_follows_what_decides_the_rows():
    base = config_hash(load(BASIC))
    same = [
        ["input.storage_options={key: AKIA, secret: s}"],
        ["output.storage_options={anon: true}"],
        ["output.path=s3://elsewhere/curated"],
        ["ray.address=ray://head:10001", "ray.num_cpus=64", "ray.no_progress_timeout_s=60"],
        ["input.paths=[other/*.tar]"],  # a nightly run over new shards is the same job
        ["input.block_rows=64", "input.read_concurrency=4", "output.write_batch_rows=10",
         "output.target_file_size_mb=1"],
    ]
    for overrides in same:
        assert config_hash(load(BASIC, overrides)) == base, overrides
    different = [
        ["operators.1.min_side.min=128"],
        ["operators.0.decode.resize_max_side=512"],
        ["output.compression=snappy"],
        ["input.format=parquet"],
    ]
    hashes = {config_hash(load(BASIC, o)) for o in different}
    assert base not in hashes and len(hashes) == len(different)
    assert config_hash(load(BASIC)) == base  # stable across loads



SHIPPED_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "conf" / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_pipeline_config_validates(path):
    """Users copy these files: each must pass the same validation `mmcurate run` (or `select`) applies."""
    if "input" not in yaml.safe_load(path.read_text()):  # a phase-2-only file: what `mmcurate select` loads
        from jobs.curate import load_select

        select_cfg, _, _ = load_select(path, [])
        assert select_cfg.rules or select_cfg.dedup
        return
    cfg = load(path, [])
    specs = cfg.operator_specs()
    assert specs and specs[0][0] == "decode"
    for name, op_cfg in specs:
        assert registry.get(name).outputs(op_cfg) is not None, name


def test_the_shipped_configs_include_the_model_pipeline():
    assert {"basic.yaml", "demo.yaml", "models.yaml"} <= {p.name for p in SHIPPED_CONFIGS}
