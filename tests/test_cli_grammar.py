"""One grammar for every command, and every CLI user error of the grammar: one line on stderr, exit code 2, no
traceback, the valid values listed, nothing written. Real `qpm` subprocesses (the parser itself is inspected
in-process for the flag table)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from qpmcli.device import cuda_device_count

NO_CUDA = cuda_device_count() == 0


def _one_line_error(out, *needles: str) -> str:
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    line = lines[0]
    assert line.startswith("Error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------- the flag table
def _commands():
    import typer

    from qpmcli.cli import app

    root = typer.main.get_command(app)
    ctx = root.make_context("qpm", ["--help"], resilient_parsing=True)
    out = {}
    for name in root.list_commands(ctx):
        cmd = root.get_command(ctx, name)
        if hasattr(cmd, "list_commands"):  # a group (typer vendors its own click classes)
            for sub in cmd.list_commands(ctx):
                out[f"{name} {sub}"] = cmd.get_command(ctx, sub)
        else:
            out[name] = cmd
    return out


SHARED = {"-d": "--dataset", "-b": "--backbone", "-m": "--model", "-o": "--out", "-q": "--quiet"}


def test_short_flags_mean_the_same_everywhere():
    seen: dict[str, set[str]] = {}
    for name, cmd in _commands().items():
        for p in cmd.params:
            if p.param_type_name != "option":
                continue
            shorts = [o for o in p.opts + p.secondary_opts if not o.startswith("--")]
            longs = [o for o in p.opts if o.startswith("--")]
            for s in shorts:
                seen.setdefault(s, set()).add(longs[0])
                if s in SHARED:
                    assert longs[0] == SHARED[s], (name, s, longs)
    for short, longs in seen.items():
        assert len(longs) == 1, (short, longs)
    assert set(SHARED) <= set(seen)


def test_shared_options_exist_where_they_apply():
    cmds = _commands()

    def opts(name):
        return {o for p in cmds[name].params for o in p.opts + p.secondary_opts}

    progress = ["extract", "train", "select", "evaluate", "name-features", "conformal", "explain", "export", "predict",
                "demo", "edit", "add-class"]
    for name in progress:
        assert {"--quiet", "-q"} <= opts(name), name
    for name in ["extract", "train", "evaluate", "name-features", "conformal", "explain", "export", "predict", "demo",
                 "edit", "add-class"]:
        assert "--device" in opts(name), name
    for name in ["extract", "train", "explain", "export", "predict"]:  # every command that builds a backbone
        assert {"--weights", "--weights-dir"} <= opts(name), name
    for name in ["extract", "train", "data check"]:
        assert {"--dataset", "-d", "--dataset-option"} <= opts(name), name
    for name in ["explain", "predict"]:
        assert {"--model", "-m"} <= opts(name), name
    for name in ["plugins", "config", "data check", "extract", "train", "select", "evaluate", "name-features",
                 "conformal", "explain", "export", "predict", "demo", "runs", "doctor", "edit", "add-class"]:
        assert "--json" in opts(name), name
    assert {"--seed"} <= opts("train") & opts("select") & opts("edit") & opts("name-features") & opts("conformal")
    assert {"--out", "-o", "--force"} <= opts("edit") & opts("add-class")
    for name in ["predict", "explain", "evaluate"]:
        assert {"--coverage", "--set-score"} <= opts(name), name
    # boolean pairs where both directions make sense
    assert {"--verify", "--no-verify", "--fp16", "--no-fp16", "--adapter", "--no-adapter"} <= opts("export")
    assert {"--resume", "--no-resume", "--bf16", "--no-bf16", "--bn-recompute", "--no-bn-recompute"} <= opts("train")
    # --device defaults to the settings everywhere (None = not given on the command line)
    for name, cmd in cmds.items():
        for p in cmd.params:
            if "--device" in p.opts:
                assert p.default is None, name


def test_help_of_every_command_stays_torch_free(isolated_env):
    import subprocess

    code = ("import sys\nfrom qpmcli.cli import app\nimport typer\n"
            "for c in ['train','extract','select','evaluate','name-features','conformal','explain','export',\n"
            "          'predict','demo','runs','doctor','edit','add-class']:\n"
            "    try:\n        app([c, '--help'], prog_name='qpm')\n    except SystemExit:\n        pass\n"
            "print('HEAVY=' + ','.join(m for m in ('torch','numpy','onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=isolated_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY="


# ------------------------------------------------------------------------------------------------- user errors
TRAIN = ["train", "-b", "dinov2-vits14", "--weights", "random", "-d", "shapes", "--selector", "topk", "--features",
         "6", "--per-class", "2", "--dense-features", "16", "--quiet"]


@pytest.mark.parametrize("args, needles", [
    # one KEY=VALUE parser, typed by the plugin's declared options
    (["extract", "-d", "shapes", "--dataset-option", "per_class=abc"],
     ["per_class", "shapes", "an integer"]),
    (["data", "check", "-d", "shapes", "--dataset-option", "per_class=abc"], ["per_class", "an integer"]),
    ([*TRAIN, "--dataset-option", "per_class=abc"], ["per_class", "an integer"]),
    ([*TRAIN, "--backbone-option", "image_size=abc"], ["image_size", "a size"]),
    ([*TRAIN, "--dataset-option", "colour=red"], ["no option 'colour'", "n_classes (int", "per_class (int"]),
    (["data", "check", "-d", "cub200", "--dataset-option", "crop=square"], ["crop", "none, bbox"]),
    ([*TRAIN, "--dataset-option", "novalue"], ["is not KEY=VALUE"]),
    # plugin names list the installed ones
    (["train", "-b", "nope"], ["unknown backbone 'nope'", "dinov2-vitb14"]),
    (["extract", "-d", "nope"], ["unknown dataset 'nope'", "shapes"]),
    ([*TRAIN, "--selector", "nope"], ["unknown selector 'nope'", "qpm", "topk"]),
    (["data", "check", "-d", "nope"], ["unknown dataset 'nope'", "cub200"]),
    (["doctor", "-b", "nope"], ["unknown backbone 'nope'"]),
    # metric names are checked before any work
    ([*TRAIN, "--metrics", "Acuracy"], ["unknown metric 'Acuracy'", "fast"]),
    (["evaluate", "nowhere", "--metrics", "SID@6"], ["unknown metric", "all, fast, essential"]),
    # selector settings
    ([*TRAIN, "--features", "3", "--per-class", "4"], ["--per-class 4 exceeds --features 3"]),
    ([*TRAIN, "--per-class", "0"], ["must be at least 1"]),
    ([*TRAIN, "--features", "3", "--per-class", "1"], ["10 classes need distinct feature sets", "C(3,1) = 3"]),
    ([*TRAIN, "--time-limit", "nan"], ["--time-limit", "positive finite"]),
    (["select", "--problem", "p.npz", "--time-limit", "inf"], ["--time-limit", "positive finite"]),
    (["select", "--problem", "p.npz", "--time-limit", "-1"], ["--time-limit", "positive finite"]),
    (["select", "--problem", "p.npz", "--features", "2", "--per-class", "3"], ["--per-class 3 exceeds"]),
    (["select", "--problem", "p.npz", "--selector", "nope"], ["unknown selector 'nope'", "qpm"]),
    # choices
    (["extract", "-d", "shapes", "--split", "val"], ["--split 'val'", "train, test, all"]),
    ([*TRAIN, "--head", "svm"], ["--head 'svm'", "qpm, linear-probe"]),
    (["evaluate", "nowhere", "--stage", "mid"], ["--stage 'mid'", "final, dense"]),
    (["predict", "x.jpg", "--device", "gpu"], ["'gpu' is not a device", "auto, cpu, cuda, cuda:N, tensorrt"]),
    (["export", "--device", "gpu", "--onnx"], ["'gpu'", "auto, cpu, cuda"]),
    (["export"], ["--onnx"]),
    # no run anywhere: say what to do
    (["explain", "img.jpg"], ["no current run", "qpm train", "qpm demo", "--model"]),
    (["predict", "img.jpg"], ["no current run", "qpm train", "qpm demo", "--model"]),
    (["export", "--onnx"], ["no current run", "qpm train", "qpm demo"]),
    (["evaluate"], ["no current run"]),
    (["conformal"], ["no current run"]),
    # prediction sets: alpha, score and coverage before any run is opened
    (["conformal", "nowhere", "--alpha", "1.5"], ["--alpha", "between 0 and 1"]),
    (["conformal", "nowhere", "--score", "best"], ["--score 'best'", "lac, aps, hier"]),
    (["predict", "x.jpg", "--coverage", "90"], ["--coverage", "between 0 and 1"]),
    (["explain", "x.jpg", "--set-score", "lac"], ["--set-score needs --coverage"]),
])
def test_user_errors_are_one_line_exit_2_and_list_valid_values(qpm, tmp_path, args, needles):
    before = _files(tmp_path)
    out = qpm(args)
    _one_line_error(out, *needles)
    assert _files(tmp_path) == before  # nothing written, nothing changed


def test_extract_accepts_the_same_options_as_train(qpm):
    """`--dataset-option per-class=16` parses in extract as in train (the run then stops at --device, up front)."""
    if not NO_CUDA:
        pytest.skip("needs a machine without CUDA to stop the command before work")
    for cmd in (["extract", "-d", "shapes"], [*TRAIN]):
        out = qpm([*cmd, "--dataset-option", "per-class=16", "--device", "cuda"])
        _one_line_error(out, "--device cuda", "no CUDA device")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("args", [
    [*TRAIN], ["extract", "-d", "shapes"], ["evaluate", "nowhere"], ["explain", "img.jpg", "-m", "m.onnx"],
    ["predict", "img.jpg", "-m", "m.onnx"], ["export", "--onnx", "run"], ["demo", "--quick"], ["serve", "m.onnx"],
    ["doctor", "--device", "cuda"],
])
def test_cuda_without_cuda_is_one_line_on_every_command(qpm, tmp_path, args):
    if args[0] == "doctor":  # doctor reports it instead: the GPU check is then needed and fails (exit 1)
        out = qpm([*args, "--json", "--no-datasets"])
        assert out.returncode == 1, out.stderr
        report = json.loads(out.stdout)
        assert "gpu" in report["missing"]
        return
    before = _files(tmp_path)
    out = qpm([*args, "--device", "cuda"])
    _one_line_error(out, "no CUDA device", "--device cpu")
    assert _files(tmp_path) == before
    out = qpm(args, env_extra={"QPM_DEVICE": "cuda:1"})  # from the settings, too, naming where it came from
    where = ["device setting (env QPM_DEVICE)"] if args[0] != "serve" else []
    _one_line_error(out, "cuda:1", "no CUDA device", *where)


@pytest.mark.parametrize("args, flag", [
    (["explain", "img.jpg", "-m", "m.onnx", "--out", "{file}"], "--out"),
    (["demo", "--out", "{file}"], "--out"),
    ([*TRAIN, "--run-dir", "{file}"], "--run-dir"),
    (["extract", "-d", "shapes", "--cache-dir", "{file}"], "--cache-dir"),
    (["select", "--problem", "p.npz", "--out", "{dir}"], "--out"),
    (["export", "run", "--onnx", "--out", "{dir}"], "--out"),
    (["export", "run", "--onnx", "--out", "{file}/model.onnx"], "--out"),
])
def test_output_paths_are_checked_before_work_and_nothing_changes(qpm, tmp_path, args, flag):
    (tmp_path / "existing.txt").write_text("keep me\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "inside.txt").write_text("me too\n")
    before = _files(tmp_path)
    args = [a.replace("{file}", str(tmp_path / "existing.txt")).replace("{dir}", str(tmp_path / "adir"))
            for a in args]
    out = qpm(args)
    _one_line_error(out, flag)
    assert _files(tmp_path) == before
    assert not list(tmp_path.rglob("*.tmp"))


def test_select_checks_the_class_count_against_binomial(qpm, tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    A = rng.random((8, 10))
    np.savez(tmp_path / "p.npz", A=A, R=np.corrcoef(A))
    out = qpm(["select", "--problem", "p.npz", "--features", "3", "--per-class", "1", "--selector", "topk"])
    _one_line_error(out, "10 classes need distinct feature sets", "C(3,1) = 3")
    assert not (tmp_path / "selection-topk.json").exists()
    out = qpm(["select", "--problem", "p.npz", "--features", "9", "--per-class", "2", "--selector", "topk"])
    _one_line_error(out, "--features 9 exceeds the 8 features of the dense model")
    out = qpm(["select", "--problem", "p.npz", "--features", "5", "--per-class", "2", "--selector", "topk", "-q",
               "--json"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["out"] == "selection-topk.json" and (tmp_path / "selection-topk.json").is_file()


def test_completion_lists_commands_options_and_plugin_names(qpm):
    def complete(words: str) -> list[str]:
        env = {"_QPM_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1),
               "_TYPER_COMPLETE_ARGS": words}
        out = qpm([], env_extra=env)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert {"train", "runs", "doctor", "explain"} <= set(complete("qpm "))
    assert {"--backbone", "--dataset", "--device"} <= set(complete("qpm train --"))
    names = complete("qpm train --backbone dinov2-vits")
    assert "dinov2-vits14" in names and "dinov2-vits14-reg" in names and all(n.startswith("dinov2-vits") for n in names)
    assert "shapes" in complete("qpm extract -d sha")
    assert {"qpm", "topk"} <= set(complete("qpm select --selector "))
    assert "--show-completion" in qpm(["--help"]).stdout


def test_state_dir_and_model_are_settings(qpm, tmp_path):
    out = qpm(["config", "--json"], env_extra={"QPM_MODEL": str(tmp_path / "m.onnx"),
                                               "QPM_STATE_DIR": str(tmp_path / "state")})
    data = json.loads(out.stdout)
    assert data["settings"]["model"] == str(tmp_path / "m.onnx") and data["sources"]["model"] == "env QPM_MODEL"
    assert data["settings"]["state_dir"] == str(tmp_path / "state")
    out = qpm(["config", "--json"])
    assert json.loads(out.stdout)["settings"]["state_dir"] == os.path.join(tmp_path, "xdg-cache", "qpm")


def test_plugins_json_lists_the_typed_options(qpm):
    data = json.loads(qpm(["plugins", "--json"]).stdout)
    shapes = next(d for d in data["datasets"] if d["name"] == "shapes")
    opts = {o["name"]: o for o in shapes["options"]}
    assert opts["per_class"]["type"] == "int" and opts["per_class"]["default"] == 40
    cub = next(d for d in data["datasets"] if d["name"] == "cub200")
    assert cub["options"][0]["choices"] == ["none", "bbox"]
    vit = next(b for b in data["backbones"] if b["name"] == "dinov2-vitb14")
    assert {o["name"]: o["type"] for o in vit["options"]} == {"image_size": "size", "arch": "json"}


def test_option_values_are_typed_in_process():
    from qpmcli.errors import ConfigError
    from qpmcli.options import parse_plugin_options

    assert parse_plugin_options("dataset", "shapes", ["per-class=3", "n_classes=4"]) == {"per_class": 3,
                                                                                          "n_classes": 4}
    assert parse_plugin_options("backbone", "dinov2-vits14", ["image_size=224x448", 'arch={"depth": 1}']) == {
        "image_size": [224, 448], "arch": {"depth": 1}}
    assert parse_plugin_options("backbone", "dinov2-vits14", ["image_size=[112, 56]"]) == {"image_size": [112, 56]}
    assert parse_plugin_options("dataset", "imagefolder", ["test_fraction=0.3"]) == {"test_fraction": 0.3}
    for bad in (["test_fraction=nan"], ["test_fraction=x"], ["seed=1.5"]):
        with pytest.raises(ConfigError, match="imagefolder"):
            parse_plugin_options("dataset", "imagefolder", bad)


# ------------------------------------------------------------------------------------- hints and --help text
def _accepted(cmd) -> set[str]:
    """What a command takes: its options' flags and its arguments' placeholders (RUN, MODEL, ...)."""
    out = set()
    for p in cmd.params:
        out.update(p.opts + p.secondary_opts if p.param_type_name == "option" else [p.metavar or p.name.upper()])
    return out


# argv that reach each command's model lookup (no current run, no QPM_MODEL): the hint must name what it takes
MODEL_COMMANDS = {"serve": [], "export": ["--onnx"], "evaluate": [], "predict": ["img.jpg"], "explain": ["img.jpg"],
                  "name-features": [], "edit": ["-o", "new-run", "--drop-feature", "3"],
                  "add-class": ["newclass", "imgs", "-o", "new-run"], "select": [], "conformal": []}


def test_every_pass_hint_names_an_option_the_command_accepts(qpm, tmp_path):
    """The no-current-run hints come from qpmcli.current (resolve_model); every command that calls it is run here
    until it gives up, and its hint may only name an option or argument of that very command."""
    import inspect
    import re

    from qpmcli import cli

    commands = _commands()
    callers = set()
    for module in cli.COMMAND_MODULES:
        source = inspect.getsource(__import__(f"qpmcli.commands.{module}", fromlist=["x"]))
        if "resolve_model" in source or "resolve_model_path" in source or "qpmcli.serve" in source:
            callers.add(module.replace("_", "-"))
    assert callers == set(MODEL_COMMANDS)  # a new caller must be added above
    (tmp_path / "imgs").mkdir()
    for name, extra in MODEL_COMMANDS.items():
        out = qpm([name, *extra], cwd=tmp_path)
        hints = re.findall(r"\bpass (--[\w-]+|[A-Z][A-Z_]+)\b", out.stderr)
        assert out.returncode == 2 and "no current run" in out.stderr, (name, out.stderr)
        assert set(hints) <= _accepted(commands[name]), (name, hints, sorted(_accepted(commands[name])))
        expected = {"serve": ["MODEL"], "predict": ["--model"], "explain": ["--model"], "select": []}
        assert hints == expected.get(name, ["RUN"]), (name, out.stderr)  # select: RUN or --problem FILE


def test_help_shows_placeholders_instead_of_type_names(qpm):
    import re

    for name in [*_commands(), ""]:
        out = qpm([*name.split(), "--help"])
        assert out.returncode == 0, (name, out.stderr)
        assert not re.findall(r"<(?:str|bool|int|float|path|list\[\w+\])>", out.stdout), (name, out.stdout)
    out = qpm(["serve", "--help"]).stdout
    assert "[MODEL]" in out and "--port" in out and "PORT" in out
    assert re.search(r"--class\s+CLASS", qpm(["explain", "--help"]).stdout)


def test_readme_train_synopsis_lists_every_train_option_the_readme_uses():
    import re

    from test_readme import README

    text = README.read_text()
    synopsis = text[text.index("qpm train [-b B]"):text.index("qpm select [RUN")]
    used = {flag for line in re.findall(r"qpm train [^`\n]*", text) for flag in re.findall(r"--[\w-]+", line)}
    listed = set(re.findall(r"--[\w-]+", synopsis))
    short = {"--backbone": "-b B", "--dataset": "-d D"}
    assert {u for u in used - listed if short.get(u) not in synopsis} == set()
