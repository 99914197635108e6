"""What a hostile or careless plugin, input file or environment cannot do: end the
process from a plugin, force blocking a built-in to block an impostor, break the shell
command of an install hint, pass ``validate`` with a missing image folder, take the
memory with a decompression bomb, or hide a test behind a skip."""

from __future__ import annotations

import shlex
import signal
import struct
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

import diffkit
from diffkit import PluginError, SpecError
from diffkit.cli import main
from diffkit.plugins import check_plugins
from diffkit.requirements import requirement_problem
from diffkit.spec import load_spec

TINY = {
    "seed": 0,
    "data": {"type": "moons", "n": 64},
    "schedule": {"type": "linear", "timesteps": 10},
    "denoiser": {"type": "mlp", "hidden": 8, "depth": 1},
    "train": {"steps": 2, "batch_size": 16, "preview": 0, "device": "cpu"},
}

# A third-party plugin that works, to show the others still load.
GOOD = """
from diffkit import Component, Params, TensorData, hookimpl
import torch

@hookimpl
def diffkit_datasets():
    return [Component("good-points", lambda p, ctx: TensorData(torch.zeros(4, 2)), Params, "")]
"""


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _info(registry, name, distribution=None):
    [info] = [p for p in registry.plugins if p.name == name and distribution in (None, p.distribution)]
    return info


@pytest.fixture
def good(make_dist):
    make_dist("good-plugin", "1.0", {"good": ("good_diffkit_plugin", GOOD)})


# -- 1. BaseException from a plugin is contained -------------------------------------------
AT_IMPORT = [
    ("import sys\nsys.exit(0)", "called sys.exit(0) at import"),
    ("import sys\nsys.exit(3)", "called sys.exit(3) at import"),
    ("import sys\nsys.exit('bye')", "called sys.exit('bye') at import"),
    ("raise SystemExit", "called sys.exit() at import"),
    ("raise GeneratorExit('stop')", "raised GeneratorExit: stop at import"),
    ("class Odd(BaseException):\n    pass\nraise Odd('odd')", "raised Odd: odd at import"),
    # raised by the plugin itself, not by a Ctrl-C: the plugin's failure, not the user's wish
    ("raise KeyboardInterrupt", "raised KeyboardInterrupt at import"),
]


@pytest.mark.parametrize("source, message", AT_IMPORT, ids=[m for _, m in AT_IMPORT])
def test_a_plugin_ending_the_process_at_import_is_reported_and_the_rest_load(make_dist, good, source, message):
    make_dist("exiting-plugin", "0.2", {"exiter": ("exiting_diffkit_plugin", source)})
    registry = diffkit.load_plugins()
    [failed] = registry.failed()
    assert (failed.name, failed.distribution, failed.version) == ("exiter", "exiting-plugin", "0.2")
    assert failed.error.startswith(message), failed.error
    assert registry.get("data", "good-points").plugin == "good"
    assert registry.get("sampler", "ddpm").plugin == "diffkit.samplers"
    [problem] = check_plugins(registry)
    assert problem.startswith(f"plugin 'exiter' (exiting-plugin 0.2) failed to load: {message}")
    with pytest.raises(PluginError, match=r"plugin 'exiter' from exiting-plugin 0\.2 failed.*strict"):
        diffkit.load_plugins(strict=True)


def test_a_plugin_raising_keyboard_interrupt_is_contained_where_sigint_is_ignored(make_dist, good):
    """A process started in the background (``cmd &`` in a script, ``nohup``) ignores SIGINT,
    so no Ctrl-C can reach it: a KeyboardInterrupt at import is the plugin's own failure."""
    import signal

    make_dist("exiting-plugin", "0.2", {"exiter": ("exiting_diffkit_plugin", "raise KeyboardInterrupt")})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        registry = diffkit.load_plugins()
    finally:
        signal.signal(signal.SIGINT, previous)
    [failed] = registry.failed()
    assert failed.error.startswith("raised KeyboardInterrupt at import"), failed.error
    assert registry.get("data", "good-points").plugin == "good"


def test_a_plugin_calling_sys_exit_in_its_hook_is_reported_and_contributes_nothing(make_dist, good):
    source = """
    import sys
    from diffkit import Component, Params, TensorData, hookimpl

    @hookimpl
    def diffkit_datasets():
        return [Component("half-made", lambda p, ctx: None, Params, "")]

    @hookimpl
    def diffkit_samplers():
        sys.exit(0)
    """
    make_dist("hook-exit", "1.1", {"hookexit": ("hook_exit_diffkit_plugin", textwrap.dedent(source))})
    registry = diffkit.load_plugins()
    [failed] = registry.failed()
    assert (failed.name, failed.distribution) == ("hookexit", "hook-exit")
    assert "called sys.exit(0) in its hook diffkit_samplers" in failed.error
    assert not registry.pm.has_plugin("hookexit")
    assert "half-made" not in {e.name for e in registry.all("data")}
    assert registry.get("data", "good-points").plugin == "good"


def test_register_plugin_turns_a_hooks_sys_exit_into_a_plugin_error():
    class Exits:
        @diffkit.hookimpl
        def diffkit_schedules(self):
            raise SystemExit(2)

    registry = diffkit.load_plugins(autoload=False)
    with pytest.raises(PluginError, match=r"plugin 'exits' called sys\.exit\(2\) in its hook diffkit_schedules"):
        registry.register_plugin(Exits(), "exits")
    assert not registry.pm.has_plugin("exits")


def test_cli_plugins_check_fails_on_a_plugin_calling_sys_exit(make_dist, capsys):
    make_dist("exiting-plugin", "0.2", {"exiter": ("exiting_diffkit_plugin", "import sys\nsys.exit(0)")})
    code, out, err = run(capsys, "plugins", "--check")
    assert code == 1
    assert "problem: plugin 'exiter' (exiting-plugin 0.2) failed to load: called sys.exit(0) at import" in out
    code, out, _ = run(capsys, "plugins")
    assert code == 0 and "plugin 'exiter' failed: called sys.exit(0) at import" in out


def test_cli_train_with_a_plugin_calling_sys_exit_trains_and_warns(make_dist, capsys, tmp_path):
    make_dist("exiting-plugin", "0.2", {"exiter": ("exiting_diffkit_plugin", "import sys\nsys.exit(0)")})
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    code, _, err = run(capsys, "train", spec, "--out", tmp_path / "run", "--no-progress")
    assert code == 0, err
    assert "warning: plugin 'exiter' (exiting-plugin 0.2) failed to load: called sys.exit(0) at import" in err
    assert (tmp_path / "run" / "spec.yaml").is_file() and (tmp_path / "run" / "denoiser.safetensors").is_file()


# A plugin during whose import the user presses Ctrl-C (the signal is sent to the process).
CTRL_C_AT_IMPORT = """
import os, signal, time
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)  # the handler runs at the next bytecode; never reached
"""


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler, as in a terminal: a test run started in the background
    (which ignores SIGINT) would otherwise never see the Ctrl-C these tests send."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_a_plugin_imports_still_interrupts(make_dist, good, capsys, ctrl_c_raises):
    make_dist("slow-plugin", "1.0", {"slow": ("slow_diffkit_plugin", CTRL_C_AT_IMPORT)})
    with pytest.raises(KeyboardInterrupt):
        diffkit.load_plugins()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    # and the command line stops as it does for any Ctrl-C
    code, _, err = run(capsys, "plugins")
    assert code == 130 and "interrupted" in err


# -- 2. an impostor named like a built-in can be blocked alone -----------------------------
IMPOSTOR = """
from diffkit import Component, Params, hookimpl

@hookimpl
def diffkit_schedules():
    return [Component("linear", lambda p, ctx: None, Params, "not the real one")]
"""


@pytest.fixture
def impostor(make_dist):
    make_dist("Shadow_Plugin", "6.6.6", {"diffkit.schedules": ("shadow_schedules_plugin", IMPOSTOR)})


def test_an_impostor_named_like_a_builtin_fails_the_check_until_blocked(impostor):
    registry = diffkit.load_plugins()
    assert _info(registry, "diffkit.schedules", "Shadow_Plugin").status == "failed"
    assert any("diffkit.schedules" in p and "Shadow_Plugin" in p for p in check_plugins(registry))


@pytest.mark.parametrize("qualified", ["Shadow_Plugin:diffkit.schedules", "shadow-plugin:diffkit.schedules"])
def test_block_dist_name_blocks_the_impostor_and_keeps_the_builtin(impostor, qualified):
    registry = diffkit.load_plugins(block=[qualified])
    assert _info(registry, "diffkit.schedules", "Shadow_Plugin").status == "blocked"
    real = _info(registry, "diffkit.schedules", "diffkit")
    assert real.status == "loaded" and real.builtin
    assert registry.get("schedule", "linear").distribution == "diffkit"
    assert check_plugins(registry) == []


def test_block_dist_name_from_the_environment(impostor, monkeypatch):
    monkeypatch.setenv("DIFFKIT_BLOCK_PLUGINS", "shadow-plugin:diffkit.schedules")
    registry = diffkit.load_plugins()
    assert _info(registry, "diffkit.schedules", "Shadow_Plugin").status == "blocked"
    assert _info(registry, "diffkit.schedules", "diffkit").status == "loaded"


def test_block_dist_name_of_a_third_party_plugin(make_dist, good):
    registry = diffkit.load_plugins(block=["good-plugin:good"])
    assert _info(registry, "good").status == "blocked"
    # a distribution that does not provide it blocks nothing
    assert _info(diffkit.load_plugins(block=["other-dist:good"]), "good").status == "loaded"


def test_blocking_a_builtins_name_plainly_is_refused_and_points_at_the_qualified_form(impostor):
    with pytest.raises(PluginError) as err:
        diffkit.load_plugins(block=["diffkit.schedules"])
    msg = str(err.value)
    assert "refusing to block built-in plugin(s) diffkit.schedules" in msg
    assert "'Shadow_Plugin:diffkit.schedules'" in msg  # the impostor, named so that it can be blocked alone


def test_blocking_the_builtin_distribution_by_qualified_name_is_refused_too():
    with pytest.raises(PluginError, match=r"refusing to block built-in plugin\(s\) diffkit:diffkit\.schedules"):
        diffkit.load_plugins(block=["diffkit:diffkit.schedules"])


def test_cli_block_dist_name(impostor, capsys):
    code, out, _ = run(capsys, "plugins", "--check")
    assert code == 1
    code, out, err = run(capsys, "plugins", "--check", "--block", "Shadow_Plugin:diffkit.schedules")
    assert code == 0, out + err
    assert out.startswith("ok: ")
    code, out, _ = run(capsys, "plugins", "--block", "Shadow_Plugin:diffkit.schedules")
    assert code == 0 and "blocked" in out


def test_cli_help_and_docs_describe_the_qualified_block(capsys):
    with pytest.raises(SystemExit):
        main(["plugins", "--help"])
    assert "DIST:NAME" in " ".join(capsys.readouterr().out.split())
    docs = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text(encoding="utf-8")
    assert "--block DIST:NAME" in docs


# -- 3. the install hint is a command the shell reads as written -------------------------
@pytest.mark.parametrize(
    "text",
    [
        "no-such-diffkit-plugin>=1.2",
        "no-such-diffkit-plugin>=1.2; python_version >= '3'",
        "no-such-diffkit-plugin[extra]<2,>=1.2",
    ],
)
def test_the_install_hint_is_quoted_for_the_shell(text):
    problem = requirement_problem(text)
    assert problem is not None
    command = problem.rpartition("Install it with: ")[2]
    assert shlex.split(command) == ["pip", "install", text]


def test_the_upgrade_hint_is_quoted_for_the_shell():
    text = "pytest>=99999; python_version >= '3'"
    problem = requirement_problem(text)
    assert problem is not None and "is installed, but the spec requires" in problem
    assert shlex.split(problem.rpartition("Install a matching version with: ")[2]) == ["pip", "install", text]


# -- 4. validate checks an image folder's root --------------------------------------------
def _image_spec(tmp_path: Path, root: Path) -> Path:
    spec = {
        "data": {"type": "image-folder", "root": str(root), "size": 8, "channels": 1},
        "denoiser": {"type": "unet", "channels": 8, "channel_mult": [1], "num_res_blocks": 1},
    }
    path = tmp_path / "images.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _write_png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(path)


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "does not exist"),
        ("file", "is not a directory"),
        ("empty", "no class subfolders"),
        ("no-images", "no images in class folder(s) cats"),
    ],
)
def test_validate_checks_that_an_image_folder_exists_and_holds_images(tmp_path, capsys, layout, message):
    root = tmp_path / "images"
    if layout == "file":
        root.write_text("not a folder")
    elif layout == "empty":
        root.mkdir()
    elif layout == "no-images":
        _write_png(root / "dogs" / "a.png")
        (root / "cats").mkdir()
        (root / "cats" / "notes.txt").write_text("no images here")
    spec = _image_spec(tmp_path, root)
    with pytest.raises(SpecError) as err:
        load_spec(spec, check_inputs=True)
    [(where, msg)] = err.value.problems
    assert where == "data.root" and message in msg and str(root) in msg
    code, out, err_text = run(capsys, "validate", spec)
    assert code == 1 and "data.root: " in err_text and message in err_text and "Traceback" not in err_text
    # reading a spec (a finished run's, whose data may have moved) does not look at the folder
    assert load_spec(spec).data.root == str(root)


def test_validate_accepts_an_image_folder_with_images(tmp_path, capsys):
    root = tmp_path / "images"
    _write_png(root / "cats" / "a.png")
    _write_png(root / "dogs" / "nested" / "b.png")
    spec = _image_spec(tmp_path, root)
    assert load_spec(spec, check_inputs=True).data.root == str(root)
    code, out, err = run(capsys, "validate", spec)
    assert code == 0, err


# -- 5. a decompression bomb is one clean message ------------------------------------------
def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width × height 1-bit pixels; its few bytes of data decode to
    far less, but a reader that trusts the header allocates for all of them."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("side", [5_000, 10_000, 100_000], ids=["over-diffkit-limit", "pil-warning", "pil-error"])
def test_read_input_refuses_a_decompression_bomb(tmp_path, side):
    from diffkit.applications import MAX_INPUT_PIXELS, read_input

    path = _png_header_only(tmp_path / "bomb.png", side, side)
    with pytest.raises(diffkit.DiffkitError) as err:
        read_input(path, channels=1)
    msg = str(err.value)
    assert msg.startswith(f"{path} has {side * side:,} pixels")
    assert f"more than the {MAX_INPUT_PIXELS:,} an input image may have" in msg and "decompression bomb" in msg
    if side * side < 89_478_485:  # below PIL's own limit, diffkit's check also knows the sides
        assert f"({side}×{side})" in msg


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    pipe = diffkit.Pipeline(
        schedule={"type": "linear", "timesteps": 10},
        denoiser={"type": "mlp", "hidden": 8, "depth": 1},
        data={"type": "moons", "n": 64},
        train={"steps": 1, "batch_size": 16, "preview": 0, "device": "cpu"},
    )
    pipe.fit(progress=False)
    return pipe.save(tmp_path_factory.mktemp("runs") / "moons")


@pytest.mark.parametrize("command", ["inpaint", "denoise", "upscale"])
def test_cli_applications_refuse_a_decompression_bomb(capsys, tmp_path, moons_run, command):
    bomb = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    extra = {"inpaint": ["--mask", bomb], "denoise": ["--strength", 0.5], "upscale": ["--factor", 2]}[command]
    code, out, err = run(capsys, command, moons_run, "--input", bomb, *extra, "--out", tmp_path / "o.npy")
    assert code == 1 and "Traceback" not in err
    assert err.startswith("diffkit: error: ") and err.count("\n") == 1
    assert "bomb.png has 10,000,000,000 pixels" in err


# -- 6. an unexpected skip fails the run ---------------------------------------------------
SKIPPING_TESTS = """
import pytest

def test_allowed():
    pytest.skip("needs CUDA")

def test_passes():
    pass
"""


def _pytest_with_our_conftest(pytester: pytest.Pytester, extra_test: str | None) -> pytest.RunResult:
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(test_allowed=SKIPPING_TESTS)
    if extra_test is not None:
        pytester.makepyfile(test_extra=extra_test)
    return pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")


def test_an_unexpected_skip_fails_the_run_and_is_named(pytester):
    extra = 'import pytest\n\ndef test_needs_a_package():\n    pytest.importorskip("no_such_module_for_diffkit")\n'
    result = _pytest_with_our_conftest(pytester, extra)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    assert "1 test was skipped for a reason not allowed" in out
    assert "test_extra.py::test_needs_a_package: could not import 'no_such_module_for_diffkit'" in out
    assert "test_allowed.py::test_allowed" not in out.partition("not allowed")[2]


def test_allowed_skips_pass_the_run(pytester):
    result = _pytest_with_our_conftest(pytester, None)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.assert_outcomes(passed=1, skipped=1)
    assert "not allowed" not in result.stdout.str()


def test_the_test_extra_installs_what_the_tests_import_or_skip():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    from packaging.requirements import Requirement

    extra = {Requirement(r).name for r in pyproject["project"]["optional-dependencies"]["test"]}
    assert {"jsonschema", "tensorboard"} <= extra
