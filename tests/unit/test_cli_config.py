"""`python -m trainer train`'s config the SimpleTuner way (trainer/cli_config.py) and the relative paths of a
multidatabackend.json in SimpleTuner's layout (trainer/databackend.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flux2_lora_pack.trainer.cli_config import find_config, load_cli_config, parse_overrides
from flux2_lora_pack.trainer.databackend import parse_backend_config


def test_overrides_take_simpletuners_spellings():
    assert parse_overrides(["--max_train_steps=3", "--learning_rate", "1e-3", "--gradient_checkpointing",
                            '--tread_config={"routes": []}', "--output_dir", "out"]) == {
        "max_train_steps": "3", "learning_rate": "1e-3", "gradient_checkpointing": "true",
        "tread_config": {"routes": []}, "output_dir": "out"}
    with pytest.raises(ValueError, match=r"unexpected argument 'stray': give config keys as --key=value"):
        parse_overrides(["--a=1", "stray"])
    with pytest.raises(ValueError, match=r"--a is given twice"):
        parse_overrides(["--a=1", "--a", "2"])
    with pytest.raises(ValueError, match=r"--tread_config: '\{oops' is not valid JSON"):
        parse_overrides(["--tread_config={oops"])


def test_the_config_is_found_where_simpletuner_keeps_it(tmp_path):
    with pytest.raises(ValueError, match=r"no --config given and neither .*config/config\.json nor .*config\.json"):
        find_config(None, cwd=tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert find_config(None, cwd=tmp_path) == tmp_path / "config.json"
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text("{}")
    assert find_config(None, cwd=tmp_path) == tmp_path / "config" / "config.json"  # SimpleTuner's own default first


def _project(tmp_path: Path, tiny_model_dir: Path, **config) -> Path:
    project = tmp_path / "project"
    (project / "config").mkdir(parents=True)
    (project / "config" / "config.json").write_text(json.dumps(
        {"pretrained_model_name_or_path": str(tiny_model_dir), "output_dir": "output", **config}))
    return project


def test_overrides_win_over_the_file_and_paths_become_absolute(tmp_path, tiny_model_dir):
    project = _project(tmp_path, tiny_model_dir, **{"--learning_rate": 1e-4, "lora_rank": 8})
    (project / "config" / "multidatabackend.json").write_text("[]")
    config = load_cli_config(None, overrides=["--learning_rate=3e-4", "--max_train_steps", "7"], cwd=project)
    assert config.optim.learning_rate == 3e-4 and config.schedule.total_steps == 7 and config.lora.rank == 8
    assert config.checkpoint.output_dir == project / "output"  # relative to the working directory, made absolute
    # no dataset named: SimpleTuner's default, config/multidatabackend.json
    assert config.data.data_backend_config == project / "config" / "multidatabackend.json"
    with pytest.raises(ValueError, match=r"config file .*config\.json with --lora_rnk=4: unknown config key 'lora_rnk'"):
        load_cli_config(None, overrides=["--lora_rnk=4"], cwd=project)


def test_a_relative_path_naming_two_existing_files_is_refused_naming_both(tmp_path, tiny_model_dir):
    project = _project(tmp_path, tiny_model_dir, data_backend_config="datasets.json")
    (project / "datasets.json").write_text("[]")
    (project / "config" / "datasets.json").write_text("[1]")
    with pytest.raises(ValueError, match=rf"data_backend_config 'datasets.json' names both {project / 'datasets.json'} "
                                         rf"\(from the working directory, as SimpleTuner reads it\) and "
                                         rf"{project / 'config' / 'datasets.json'} \(beside the config file\)"):
        load_cli_config(None, overrides=[], cwd=project)
    (project / "datasets.json").unlink()  # only beside config.json: read there
    config = load_cli_config(None, overrides=[], cwd=project)
    assert config.data.data_backend_config == project / "config" / "datasets.json"


def test_multidatabackend_paths_in_simpletuners_layout_are_read_from_the_folder_holding_config(tmp_path):
    project = tmp_path / "project"
    (project / "config").mkdir(parents=True)
    (project / "datasets" / "faces").mkdir(parents=True)
    entry = {"id": "faces", "instance_data_dir": "datasets/faces", "cache_dir_vae": "cache/vae/faces"}
    config = parse_backend_config([entry], base_dir=project / "config")
    assert config.datasets[0].instance_data_dir == project / "datasets" / "faces"
    assert config.datasets[0].cache_dir_vae == project / "cache" / "vae" / "faces"  # SimpleTuner's reading
    (project / "config" / "datasets" / "faces").mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"dataset 'faces': instance_data_dir 'datasets/faces' names both "
                                         rf"{project / 'datasets' / 'faces'} .* and {project / 'config' / 'datasets' / 'faces'}"):
        parse_backend_config([entry], base_dir=project / "config")
    # outside SimpleTuner's layout the file's own folder is the base, as before
    other = tmp_path / "elsewhere"
    (other / "datasets" / "faces").mkdir(parents=True)
    assert parse_backend_config([entry], base_dir=other).datasets[0].instance_data_dir == other / "datasets" / "faces"
