"""Writing and reading run directories: safetensors for tensors, YAML/JSON for the rest.

Every file is written atomically (temporary file, fsync, rename), so a crash while
saving leaves the previous file whole. Nothing is ever unpickled.

Training checkpoints (:class:`CheckpointDir`) are pairs ``step-00000100.safetensors`` +
``step-00000100.json``: the tensors first, then the JSON, which records the tensors'
size and SHA-256. A checkpoint counts only once its JSON exists and the tensors match
it, so one cut short by a crash (or damaged later) is recognised and passed over.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import safetensors.torch
from pydantic import BaseModel, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from diffkit.errors import DiffkitError

__all__ = [
    "atomic_write",
    "remove_stale_tmp",
    "write_text",
    "write_json",
    "save_tensors",
    "load_tensors",
    "sha256_file",
    "read_json",
    "read_text",
    "TrainingCheckpoint",
    "CheckpointDir",
    "CHECKPOINT_FORMAT",
    "state_dict_mismatch",
    "resolve_recorded_components",
]

CHECKPOINT_FORMAT = "diffkit-train-checkpoint-1"


TMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
"""The temporary files :func:`atomic_write` writes beside a file: ``.NAME.PID.RANDOM.tmp``."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_stale_tmp(directory: str | Path, name: str | None = None) -> None:
    """Delete the temporary files in ``directory`` (those of ``name`` only, if given) that
    :func:`atomic_write` left when its process was killed (their process no longer runs)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        m = TMP_NAME.match(entry.name)
        if m and (name is None or m["name"] == name) and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            entry.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it
    over ``path``: readers see the old file or the new one, never half of one. The file
    gets the permissions the umask gives a new file, and an error names ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(path.parent, path.name)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise DiffkitError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is 0600; a file written in place would follow the umask
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DiffkitError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_text(path: str | Path) -> str:
    """A UTF-8 text file of a run directory; a :class:`DiffkitError` naming the file and
    the first bad byte if it is not UTF-8 (damaged)."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DiffkitError(
            f"{path} is not UTF-8 text (byte {exc.start}, line {line}: {raw[exc.start:exc.start + 1]!r}); the file is"
            " damaged"
        ) from None


def parse_json(path: Path, text: str) -> Any:
    """``json.loads(text)`` with errors that name ``path``, the file it came from."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DiffkitError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); the file is damaged") from None
    except RecursionError:
        raise DiffkitError(f"{path} is nested too deeply to be a diffkit file; the file is damaged") from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise DiffkitError(f"{path} is missing; is {path.parent} a diffkit run directory?") from None
    return parse_json(path, text)


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Save tensors as safetensors, atomically."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(flat, str(p), metadata=metadata))


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tensors(path: str | Path, sha256: str | None = None) -> dict[str, Tensor]:
    """Load a safetensors file, with an error that names the file if it is missing or
    damaged, or (given ``sha256``) if its bytes are not the ones recorded when it was saved."""
    path = Path(path)
    if not path.is_file():
        raise DiffkitError(f"{path} is missing; is {path.parent} a diffkit run directory?")
    try:
        if sha256 is None:
            return load_file(str(path))
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != sha256:
            raise DiffkitError(
                f"{path} is damaged or truncated: its SHA-256 is not the one recorded in meta.json when it was saved"
                " (the file was changed since); restore it, or train the run again"
            )
        return safetensors.torch.load(blob)
    except (SafetensorError, OSError, ValueError) as exc:
        raise DiffkitError(f"{path} is not a readable safetensors file ({exc}); the file is damaged or truncated") from None


# -- training checkpoints ----------------------------------------------------------------
_NAME = re.compile(r"^step-(\d{8,})\.(safetensors|json)$")


_Count = Annotated[int, Field(ge=0, strict=True)]


class _OptimizerRecord(BaseModel):
    param_groups: list[dict[str, Any]]
    scalars: dict[Annotated[str, Field(pattern=r"^\d+\..+$")], Any]


class _TrainRecord(BaseModel):
    """The ``train`` record of a checkpoint's JSON: where training stands (see :func:`diffkit.train.train`)."""

    step: _Count
    batches: _Count
    ema_updates: _Count
    window: _Count
    skipped: _Count
    world_size: Annotated[int, Field(ge=1, strict=True)]
    optimizer: _OptimizerRecord
    scaler: dict[str, Any] | None = None


@dataclass
class TrainingCheckpoint:
    """One checkpoint read back whole: its tensors and its JSON state."""

    path: Path
    """The checkpoint's JSON file (its tensors lie beside it, ``.safetensors``)."""
    step: int
    tensors: dict[str, Tensor]
    state: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.stem


class CheckpointDir:
    """The checkpoints of one training run in ``directory``, the newest ``keep`` of them kept."""

    def __init__(self, directory: str | Path, keep: int) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def _pairs(self) -> dict[int, set[str]]:
        found: dict[int, set[str]] = {}
        if self.directory.is_dir():
            for entry in self.directory.iterdir():
                m = _NAME.match(entry.name)
                if m:
                    found.setdefault(int(m.group(1)), set()).add(m.group(2))
        return found

    def steps(self) -> list[int]:
        """Steps of the checkpoints whose JSON was written (complete unless damaged), newest first."""
        return sorted((step for step, parts in self._pairs().items() if "json" in parts), reverse=True)

    def exists(self) -> bool:
        """Whether any checkpoint, complete or not, is here."""
        return bool(self._pairs())

    def paths(self, step: int) -> tuple[Path, Path]:
        """The tensors and JSON files of the checkpoint of ``step``."""
        stem = self.directory / f"step-{step:08d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def write(self, step: int, tensors: dict[str, Tensor], state: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step`` (tensors, then the JSON that vouches for them),
        then delete all but the newest ``keep``. Returns the JSON's path."""
        tensor_path, json_path = self.paths(step)
        flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        blob = safetensors.torch.save(flat, metadata={"format": CHECKPOINT_FORMAT})
        atomic_write(tensor_path, lambda p: p.write_bytes(blob))
        record = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "tensors": {"file": tensor_path.name, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()},
            **state,
        }
        write_json(json_path, record)
        self._prune(step)
        return json_path

    def _prune(self, written: int) -> None:
        """Delete the checkpoints newer than the one just ``written`` (left by a run that was
        resumed from an earlier one because they could not be read: abandoned now that a
        newer good state exists), then all but the newest ``keep`` of the rest."""
        steps = self.steps()
        stale = [s for s in steps if s > written]
        kept = [s for s in steps if s <= written]
        for step in stale + kept[self.keep :]:
            tensor_path, json_path = self.paths(step)
            json_path.unlink(missing_ok=True)  # first: a half-deleted checkpoint is an incomplete one
            tensor_path.unlink(missing_ok=True)

    def read(self, step: int) -> TrainingCheckpoint:
        """The checkpoint of ``step``; a :class:`DiffkitError` naming the file if it is
        missing, truncated or otherwise damaged."""
        tensor_path, json_path = self.paths(step)
        try:
            state = parse_json(json_path, read_text(json_path))
        except FileNotFoundError:
            raise DiffkitError(f"{json_path} is missing") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("step") != step:
            raise DiffkitError(f"{json_path} is not a diffkit training checkpoint of step {step}")
        if not isinstance(state.get("tensors"), dict) or not isinstance(state.get("train"), dict):
            raise DiffkitError(f"{json_path} lacks its 'tensors' or 'train' record; it is damaged")
        try:
            _TrainRecord.model_validate(state["train"])
        except ValidationError as err:
            e = err.errors()[0]
            where = ".".join(str(p) for p in ("train", *e["loc"]))
            raise DiffkitError(f"{json_path} is damaged: {where}: {e['msg']}") from None
        if state["train"]["step"] != step:
            raise DiffkitError(f"{json_path} is damaged: train.step is {state['train']['step']}, not {step}")
        expected = state.get("tensors", {})
        try:
            blob = tensor_path.read_bytes()
        except FileNotFoundError:
            raise DiffkitError(f"{tensor_path} is missing") from None
        if len(blob) != expected.get("bytes") or hashlib.sha256(blob).hexdigest() != expected.get("sha256"):
            raise DiffkitError(
                f"{tensor_path} is damaged: {len(blob)} bytes whose SHA-256 does not match the"
                f" {expected.get('bytes')} bytes recorded in {json_path.name} (truncated or overwritten)"
            )
        try:
            tensors = safetensors.torch.load(blob)
        except (SafetensorError, ValueError) as exc:
            raise DiffkitError(f"{tensor_path} is not a readable safetensors file ({exc})") from None
        return TrainingCheckpoint(json_path, step, tensors, state)

    def latest(self, warn: Callable[[str], None]) -> TrainingCheckpoint | None:
        """The newest checkpoint that reads back whole; each damaged one passed over is
        reported through ``warn`` by name, and left in place."""
        for step in self.steps():
            try:
                return self.read(step)
            except DiffkitError as exc:
                warn(f"checkpoint {self.paths(step)[1].stem} cannot be used: {exc}; trying the one before")
        return None

    def clear(self) -> None:
        """Delete every checkpoint here (and temporary files of interrupted writes)."""
        if not self.directory.is_dir():
            return
        for entry in self.directory.iterdir():
            if _NAME.match(entry.name) or (entry.name.startswith(".step-") and TMP_NAME.match(entry.name)):
                entry.unlink(missing_ok=True)

    def remove_leftovers(self) -> None:
        """Delete the temporary files of writes a crash interrupted."""
        remove_stale_tmp(self.directory)


# -- what a run was trained with -------------------------------------------------------------
def state_dict_mismatch(expected: Mapping[str, Tensor], saved: Mapping[str, Tensor]) -> str | None:
    """Why ``saved`` tensors do not load into a module whose ``state_dict()`` is ``expected``,
    in full: every missing, unexpected and mis-shaped tensor; ``None`` where they fit."""
    missing = sorted(k for k in expected if k not in saved)
    unexpected = sorted(k for k in saved if k not in expected)
    shaped = sorted(
        f"{k} (saved {list(saved[k].shape)}, expected {list(expected[k].shape)})"
        for k in expected
        if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)
    )
    parts = [
        f"{len(names)} {what}: {', '.join(names)}"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped))
        if names
    ]
    return "; ".join(parts) or None


def _source(record: Mapping[str, Any]) -> str:
    dist = " ".join(str(v) for v in (record.get("distribution"), record.get("version")) if v)
    return f"plugin '{record.get('plugin')}'" + (f" ({dist})" if dist else "")


def _install_hint(record: Mapping[str, Any]) -> str:
    dist, version = record.get("distribution"), record.get("version")
    if not dist:
        return "register that plugin before loading the run"
    return f"install it with: pip install '{dist}=={version}'" if version else f"install it with: pip install '{dist}'"


def resolve_recorded_components(
    raw: Any, components: Any, registry: Any, where: str | Path
) -> tuple[Any, list[str]]:
    """A run's spec (as parsed from its ``spec.yaml``) with each section bound to the plugin
    that built it, as ``meta.json``'s ``components`` records: a section whose plain name
    another plugin has since provided too (or instead) is given the qualified
    ``PLUGIN:NAME`` of the one it was trained with, so that a plugin installed later changes
    nothing. A recorded plugin that is no longer installed, or no longer provides the
    component, is a :class:`DiffkitError` naming it with its version and how to install it.

    Returns the spec and one note per component whose plugin is now installed at another
    version than the run recorded (for the messages of errors that follow). Runs saved
    before components were recorded are returned as they are."""
    from diffkit.spec import SECTIONS, nested_sections

    if not isinstance(raw, Mapping) or not isinstance(components, Mapping):
        return raw, []
    raw = copy.deepcopy(raw)
    changed: list[str] = []
    kinds: dict[str, str] = dict(SECTIONS)
    for path in sorted(components, key=lambda p: p.count(".")):
        record = components[path]
        kind = kinds.get(path)
        parent, _, field = path.rpartition(".")
        node: Any = raw
        for part in path.split(".")[:-1]:
            node = node.get(part) if isinstance(node, Mapping) else None
        if kind is None or not isinstance(record, Mapping) or not isinstance(node, dict) or not record.get("plugin"):
            continue
        section = node.get(field)
        if isinstance(section, str):
            section = node[field] = {"type": section}
        if not isinstance(section, dict) or not isinstance(section.get("type"), str):
            continue
        plugin, name = str(record["plugin"]), section["type"].rpartition(":")[2]
        found = [e for e in registry.all(kind) if e.plugin == plugin and e.name == name]
        info = next((p for p in registry.plugins if p.name == plugin), None)
        if not found and (info is None or info.status != "loaded") and record.get("distribution") != "diffkit":
            if info is None or info.status == "not-loaded":
                state = "which is not installed"
                if info is not None:
                    state = "which is installed but not loaded (autoloading is off)"
            else:
                state = f"which is installed but {info.status}" + (f": {info.error}" if info.error else "")
            raise DiffkitError(
                f"{where}: the run's {path} is {kind} '{name}' of {_source(record)}, {state}; {_install_hint(record)}"
            )
        if not found:  # spec.yaml names another component than the run recorded, or a built-in moved: by name
            continue
        entry = found[0]
        if (entry.distribution, entry.version) != (record.get("distribution"), record.get("version")):
            now = " ".join(v for v in (entry.distribution, entry.version) if v) or "no distribution"
            changed.append(f"{path}: {kind} '{name}' was trained with {_source(record)}, and {now} is installed")
        try:
            plain = registry.get(kind, name)
        except DiffkitError:
            plain = None
        if plain is not entry:
            section["type"] = entry.qualified
        for sub, sub_kind in nested_sections(entry.component.params).items():
            kinds[f"{path}.{sub}"] = sub_kind
    return raw, changed
