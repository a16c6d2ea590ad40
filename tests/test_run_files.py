"""Every file of a run directory has one writer.

The scan reads the source of `loratui/` (AST, no imports) and lists, for every run-directory file, the
modules that write it: those calling its write function in `loratui.runs`, and those writing it by name or
by its `RunDir` path (which only the module in `loratui.runs` that defines the file may do). It also reads
the files back through the typed functions.
"""

from __future__ import annotations

import ast
import json
from collections import defaultdict
from pathlib import Path

import pytest

from loratui.config import ResolvedConfig, TrainConfig
from loratui.runs.config_file import live_changes, read_run_config, write_run_config
from loratui.runs.launch_file import LaunchFileError, LaunchSpec, read_launch, write_launch
from loratui.runs.oom_file import OomRecord, read_oom, write_oom
from loratui.runs.rundir import create_run_dir

PACKAGE = Path(__file__).resolve().parents[1] / "loratui"

# file -> (the loratui.runs module that defines and writes it, its write functions, the one module that calls
# them: the file's only writer)
OWNED = {
    "config.yaml": ("loratui.runs.config_file", {"write_run_config"}, "loratui.train.process.launch"),
    "launch.json": ("loratui.runs.launch_file", {"write_launch"}, "loratui.train.process.launch"),
    "oom.json": ("loratui.runs.oom_file", {"write_oom"}, "loratui.train.oom.record"),
    "checkpoints/": ("loratui.runs.checkpoints", {"write_checkpoint"}, "loratui.train.loop.checkpointing"),
}
# status.json and events.jsonl are the running processes' shared record: written only through
# `loratui.runs.status` / `loratui.runs.events`, by the modules listed here.
SHARED = {
    "status.json": (
        "loratui.runs.status",
        {"write_status"},
        {
            "loratui.train.process.launch",  # "starting", before any process runs
            "loratui.train.process.supervisor",
            "loratui.train.process.worker",
            "loratui.train.loop.reporting",
            "loratui.runs.stop",  # a run killed with `loratui stop --now` cannot record its own end
            "loratui.runs.rundir",  # RunDir.write_status, the shortcut the others call
        },
    ),
    "events.jsonl": (
        "loratui.runs.events",
        {"EventWriter", "event_writer"},
        {
            "loratui.train.process.supervisor",
            "loratui.train.process.worker",
            "loratui.train.loop.reporting",
            "loratui.runs.stop",
            "loratui.runs.rundir",  # RunDir.event_writer, the constructor's shortcut
        },
    ),
}
# What names a file in a write: its name, its RunDir property, its path function and constant.
MARKERS = {
    "config.yaml": {"config.yaml", "config_path", "CONFIG_FILE"},
    "launch.json": {"launch.json", "launch_path", "LAUNCH_FILE"},
    "oom.json": {"oom.json", "oom_path", "OOM_FILE"},
    "status.json": {"status.json", "status_path"},
    "events.jsonl": {"events.jsonl", "events_path"},
    "worker.log": {"worker.log"},
}
RAW_WRITERS_ALLOWED = {
    "config.yaml": {"loratui.runs.config_file"},
    "launch.json": {"loratui.runs.launch_file"},
    "oom.json": {"loratui.runs.oom_file"},
    "status.json": {"loratui.runs.status"},
    "events.jsonl": {"loratui.runs.events"},
    "worker.log": {"loratui.train.process.supervisor"},  # the supervisor's (and worker's) output
}
# Writes files of its own by name: a checkpoint keeps its copy of the config (checkpoints/step-N/config.yaml).
OWN_COPIES = {("config.yaml", "loratui.runs.checkpoints")}
# Test support inside the package: writes synthetic run directories for the TUI's tests.
FIXTURES = {"loratui.tui.testing"}
RAW_CALLS = {"write_text", "write_bytes", "atomic_write_text", "atomic_write_bytes", "atomic_directory"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


def _mentions(node: ast.AST) -> set[str]:
    """Names, attribute names and string constants inside `node`."""
    found: set[str] = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            found.add(child.id)
        elif isinstance(child, ast.Attribute):
            found.add(child.attr)
        elif isinstance(child, ast.Constant) and isinstance(child.value, str):
            found.add(child.value)
    return found


def _opens_for_writing(call: ast.Call) -> bool:
    modes = [a for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    modes += [k.value for k in call.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
    return any(isinstance(m.value, str) and set(m.value) & set("wax") for m in modes)


def _status_write(call: ast.Call) -> bool:
    """`RunStatus(...).write(path)` / `status.write(path)` (a RunStatus written to a path)."""
    func = call.func
    if not (isinstance(func, ast.Attribute) and func.attr == "write"):
        return False
    receiver = _mentions(func.value)
    return "RunStatus" in receiver or "status" in receiver


def scan() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(file -> modules calling its write functions, file -> modules writing it by name or path)."""
    typed: dict[str, set[str]] = defaultdict(set)
    raw: dict[str, set[str]] = defaultdict(set)
    functions = {name: file for file, (_, names, *_) in {**OWNED, **SHARED}.items() for name in names}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = _called_name(node)
            if name in functions:
                typed[functions[name]].add(module)
            if _status_write(node):
                typed["status.json"].add(module)
            if name in RAW_CALLS or (name == "open" and _opens_for_writing(node)):
                mentioned = _mentions(node)
                for file, markers in MARKERS.items():
                    if mentioned & markers and (file, module) not in OWN_COPIES:
                        raw[file].add(module)
    return typed, raw


def test_each_run_directory_file_has_one_writer() -> None:
    typed, _ = scan()
    listing = {file: sorted(typed[file]) for file in OWNED}
    for file, (owner, _, writer) in OWNED.items():
        assert typed[file] == {writer}, f"{file}: written by {listing[file]}, expected only {writer}"
        assert (PACKAGE.parent / (owner.replace(".", "/") + ".py")).is_file()


def test_status_and_events_are_written_only_through_runs() -> None:
    typed, _ = scan()
    for file, (_, _, writers) in SHARED.items():
        assert typed[file] - FIXTURES == writers, f"{file}: written by {sorted(typed[file])}"


def test_no_module_writes_a_run_file_by_name_or_path() -> None:
    _, raw = scan()
    for file, allowed in RAW_WRITERS_ALLOWED.items():
        assert raw[file] - FIXTURES - allowed == set(), f"{file} is written directly by {sorted(raw[file])}"
    for file in ("config.yaml", "launch.json", "oom.json", "worker.log"):  # the I/O happens in one place
        assert raw[file] - FIXTURES == RAW_WRITERS_ALLOWED[file]


def test_the_scan_sees_a_second_writer(tmp_path: Path) -> None:
    """The scanner itself: a raw `launch.json` write and a second caller are both caught."""
    source = (
        "from loratui.runs.launch_file import write_launch\n"
        "def f(run):\n"
        "    (run.path / 'launch.json').write_text('{}')\n"
        "    write_launch(run.path, None)\n"
    )
    tree = ast.parse(source)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    raw = [c for c in calls if _called_name(c) in RAW_CALLS and _mentions(c) & MARKERS["launch.json"]]
    typed = [c for c in calls if _called_name(c) in OWNED["launch.json"][1]]
    assert len(raw) == 1 and len(typed) == 1


def test_launch_spec_round_trip_and_clear_errors(tmp_path: Path) -> None:
    run = create_run_dir(tmp_path, "r")
    spec = LaunchSpec(resume_from=run.checkpoints_dir / "step-4", skip_checks=True, processes=None, gpu="1")
    write_launch(run.path, spec)
    assert read_launch(run.path) == spec
    assert json.loads(run.launch_path.read_text())["gpu"] == "1"
    assert not list(run.path.glob(".launch.json.*"))  # atomic: no temporary left behind
    run.launch_path.write_text("[1, 2]")
    with pytest.raises(LaunchFileError, match="launch.json: expected a JSON object"):
        read_launch(run.path)
    run.launch_path.unlink()
    with pytest.raises(LaunchFileError, match="launch.json: missing"):
        read_launch(run.path)


def test_oom_record_round_trip_keeps_unknown_keys(tmp_path: Path) -> None:
    run = create_run_dir(tmp_path, "r")
    assert read_oom(run.path) is None
    record = OomRecord(original={"batch_size": 4}, current={"batch_size": 2}, other={"note": "kept"})
    write_oom(run.path, record)
    assert read_oom(run.path) == record
    data = json.loads(run.oom_path.read_text())
    assert data == {"original": {"batch_size": 4}, "current": {"batch_size": 2}, "note": "kept"}


def test_live_config_lays_the_ladder_settings_over_config_yaml(tmp_path: Path) -> None:
    run = create_run_dir(tmp_path, "r")
    write_run_config(
        run.path, ResolvedConfig(TrainConfig(task_type="text-generation", batch_size=4), {}, "llm")
    )
    assert read_run_config(run.path).config.batch_size == 4  # no oom.json: config.yaml as written
    write_oom(
        run.path, OomRecord(original={"batch_size": 4, "epochs": 1}, current={"batch_size": 2, "epochs": 1})
    )
    live = read_run_config(run.path)
    assert live.config.batch_size == 2 and live.sources["batch_size"] == "oom recovery"
    assert "batch_size: 4\n" in run.config_path.read_text()  # config.yaml itself is not rewritten
    # a value the user changed since the ladder started from it (a resume with new flags) stays the user's
    resumed = ResolvedConfig(TrainConfig(task_type="text-generation", batch_size=1), {}, "llm")
    assert live_changes(resumed, run.path) == {}
