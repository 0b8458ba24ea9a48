"""`python -m trainer train --num-processes N` / `--export`: the Train LoRA node's launcher (trainer.run), from a
shell."""

from __future__ import annotations

import json
from pathlib import Path

from flux2_lora_pack.trainer.__main__ import main
from flux2_lora_pack.trainer.events import read_events
from flux2_lora_pack.trainer.launch import export_instructions
from flux2_lora_pack.trainer.runlock import LOCK_FILE


def _write(config: dict, path: Path) -> Path:
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_num_processes_trains_under_torchrun_and_prints_the_events(runs, tiny_model_dir, square_dataset, tmp_path,
                                                                    capsys):
    out = tmp_path / "run"
    config = _write(runs.run_config(tiny_model_dir, square_dataset, out, max_train_steps=3), tmp_path / "my.json")
    assert main(["train", "--config", str(config), "--num-processes", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    events = [json.loads(line) for line in printed if line.startswith("{")]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3] and events[-1]["event"] == "end"
    [lora] = out.glob("*.safetensors")
    assert f"LoRA: {lora}" in printed and "steps: 3  final loss: " in "\n".join(printed)
    assert json.loads((out / "run.json").read_text())["max_train_steps"] == 3  # what torchrun was given
    assert not (out / LOCK_FILE).exists()  # released
    assert [e["event"] for e in read_events(out / "events.jsonl")].count("start") == 1
    # The preflight's estimates come first (this CPU has no time estimate), and stay in the run folder.
    kinds = [e["event"] for e in events]
    assert kinds.index("preflight") < kinds.index("start")
    assert "no time estimate for cpu" in events[kinds.index("preflight")]["summary"]
    assert json.loads((out / "preflight.json").read_text())["time"]["no_estimate"].startswith("training on the CPU")


def test_a_run_started_directly_prints_the_preflight_and_records_it(runs, tiny_model_dir, square_dataset, tmp_path):
    out = tmp_path / "direct"
    proc = runs.launch(runs.run_config(tiny_model_dir, square_dataset, out, max_train_steps=1))
    assert "estimated peak" in proc.stdout and "no time estimate for cpu: training on the CPU" in proc.stdout
    record = json.loads((out / "preflight.json").read_text())
    assert record["estimate"] is True and record["time"]["inputs"]["max_train_steps"] == 1


def test_export_prints_the_cluster_command_the_node_prints(runs, tiny_model_dir, square_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    config = _write(runs.run_config(tiny_model_dir, square_dataset, out), tmp_path / "my.json")
    assert main(["train", "--config", str(config), "--export", "--num-processes", "8"]) == 0
    expected = export_instructions(config_path=out / "run.json", num_processes=8)
    assert capsys.readouterr().out == expected + "\n"
    assert (out / "COMMAND.txt").read_text() == expected + "\n"
    assert not (out / "train.log").exists() and not (out / LOCK_FILE).exists()  # nothing was launched


def test_relative_paths_are_read_from_the_working_directory_as_simpletuner_reads_them(runs, tiny_model_dir,
                                                                                      square_dataset, tmp_path, capsys,
                                                                                      monkeypatch):
    # torchrun starts in the pack's folder: the launcher makes every relative path absolute first (cli_config)
    monkeypatch.chdir(tmp_path)
    config = _write(runs.run_config(tiny_model_dir, square_dataset, Path("run"), max_train_steps=1),
                    tmp_path / "my.json")
    assert main(["train", "--config", "my.json", "--num-processes", "1"]) == 0
    written = json.loads((tmp_path / "run" / "run.json").read_text())
    assert written["output_dir"] == str(tmp_path / "run")
    assert list((tmp_path / "run").glob("*.safetensors"))
