"""Trust boundaries (run folders read only inside themselves, no folder code, no pickles), output locks, text
recognised by content, and unwritable outputs: all on tiny random models built here."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_model, tiny_tokenizer
from test_cli import assert_user_error, run_cli

from weightwise.data.corpora import corpus
from weightwise.errors import OutputError, WeightwiseError
from weightwise.io import atomic_output_dir, load_model, output_lock, write_bytes_atomic
from weightwise.io.artifacts import lock_path
from weightwise.io.folders import save
from weightwise.quantize.api import quantize

SRC = Path(__file__).resolve().parents[1] / "src"


def _quantized_run(path: Path) -> Path:
    return save(quantize(tiny_model(), {"format": "int8", "group_size": 32}), path, tokenizer=tiny_tokenizer())


# --- trust boundaries --------------------------------------------------------------------------


def test_run_folder_link_to_outside_is_refused(tmp_path):
    run = _quantized_run(tmp_path / "run")
    assert load_model(run)[0] is not None
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(run / "model.safetensors", elsewhere)
    (run / "model.safetensors").symlink_to(elsewhere)
    with pytest.raises(WeightwiseError, match="model.safetensors.*is a link to .*outside the folder"):
        load_model(run)


def test_run_folder_link_inside_it_is_fine(tmp_path):
    run = _quantized_run(tmp_path / "run")
    (run / "sub").mkdir()
    shutil.move(run / "tokenizer.json", run / "sub" / "tokenizer.json")
    (run / "tokenizer.json").symlink_to(Path("sub") / "tokenizer.json")
    assert load_model(run)[1] is not None


def test_cli_refuses_a_run_folder_with_a_link_out(capsys, monkeypatch, tmp_path):
    run = _quantized_run(tmp_path / "run")
    (tmp_path / "secret.json").write_text("{}")
    (run / "tokenizer_config.json").unlink()
    (run / "tokenizer_config.json").symlink_to(tmp_path / "secret.json")
    out = tmp_path / "out"
    assert_user_error(run_cli(capsys, monkeypatch, "export", run, "--to", "hf", "-o", out), "outside the folder", out)


@pytest.mark.parametrize("shard", ["/etc/passwd", "../elsewhere.safetensors", "sub/../../x.safetensors"])
def test_shard_index_naming_a_file_outside_is_refused(tiny_dir, shard):
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}
    (tiny_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightwiseError, match="not inside"):
        load_model(tiny_dir)


def _with_folder_code(folder: Path, marker: Path) -> None:
    """Ship 'custom code' in ``folder`` that would create ``marker`` if it ever ran."""
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")


def test_model_code_in_the_folder_is_not_run(tiny_dir, tmp_path, caplog):
    marker = tmp_path / "ran"
    _with_folder_code(tiny_dir, marker)
    config = json.loads((tiny_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="weightwise.io.models"):
        model, _ = load_model(tiny_dir)  # a built-in class exists for llama: the folder's code is ignored
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()
    assert "not running it" in caplog.text
    config["model_type"] = "evil"
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightwiseError, match="trust_remote_code=True"):
        load_model(tiny_dir)
    assert not marker.exists()


def test_tokenizer_code_in_the_folder_is_refused(capsys, monkeypatch, tiny_dir, tmp_path):
    marker = tmp_path / "ran"
    _with_folder_code(tiny_dir, marker)
    settings = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    settings.update(auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer")
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(WeightwiseError, match="tokenizer .* trust_remote_code=True"):
        load_model(tiny_dir)
    out = tmp_path / "out"
    assert_user_error(run_cli(capsys, monkeypatch, "quantize", tiny_dir, "-f", "int8", "-g", "32", "-o", out), "trust_remote_code", out)
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    """Pickles hold code: every torch.load in the package must pass weights_only=True."""
    offenders = []
    for file in SRC.rglob("*.py"):
        for match in re.finditer(r"(?<![\w.])torch\.load\((.*?)\)", file.read_text(encoding="utf-8"), re.S):
            if "weights_only=True" not in match.group(1):
                offenders.append(f"{file}: {match.group(0)[:60]}")
    assert not offenders


# --- output locks ------------------------------------------------------------------------------


_HOLDER = """
import sys, time
from weightwise.io import atomic_output_dir
with atomic_output_dir(sys.argv[1]) as tmp:
    (tmp / "part").write_text("half")
    print("holding", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    """Start another process that holds the lock of an output (it writes there for a minute); yields (output, process)."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "holding"
        yield out, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_writer_is_refused_naming_the_lock_and_pid(holder):
    out, proc = holder
    with pytest.raises(OutputError, match=rf"pid {proc.pid} .*lock file '.*\.out\.lock'"):
        with atomic_output_dir(out):
            pass
    with pytest.raises(OutputError, match="another process"):
        save(tiny_model(), out)
    assert not out.exists()


def test_a_killed_writers_lock_is_taken_over(holder, caplog):
    out, proc = holder
    proc.kill()
    proc.wait()
    assert lock_path(out).is_file()  # left behind: the holder was killed
    with caplog.at_level(logging.WARNING, logger="weightwise.io.artifacts"):
        with atomic_output_dir(out) as tmp:
            (tmp / "done").write_text("yes")
    assert "taking over the lock" in caplog.text and str(proc.pid) in caplog.text
    assert (out / "done").read_text() == "yes" and not lock_path(out).exists()


@pytest.mark.parametrize("command", [
    ["quantize", "{model}", "-f", "int8", "-g", "32", "-o", "{out}"],
    ["export", "{model}", "--to", "hf", "-o", "{out}"],
    ["patch", "apply", "{model}", "{patch}", "-o", "{out}"],
    ["tune", "{model}", "--steps", "1", "-o", "{out}"],
])
def test_cli_writers_refuse_a_locked_output(capsys, monkeypatch, tiny_dir, tmp_path, holder, command):
    from weightwise.io.artifacts import state_dict_fingerprint
    from weightwise.tune.patch import WeightPatch

    out, proc = holder
    model = tiny_model()
    tuned = {name: t + 1e-3 for name, t in model.state_dict().items()}
    patch = WeightPatch.from_models(model.state_dict(), tuned, {"base_model_hash": state_dict_fingerprint(model)})
    patch.save(tmp_path / "p.safetensors")
    args = [a.format(model=tiny_dir, out=out, patch=tmp_path / "p.safetensors") for a in command]
    assert_user_error(run_cli(capsys, monkeypatch, *args), f"pid {proc.pid}", out)


def test_lock_is_released_on_an_exception_and_nests(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with output_lock(out) as lock:
            with output_lock(out):  # nested in one process: free
                assert lock.read_text().split()[0] == str(os.getpid())
            assert lock.is_file()  # the outer block still holds it
            raise RuntimeError("boom")
    assert not lock_path(out).exists()


def test_stale_and_half_written_lock_files(tmp_path, caplog):
    out = tmp_path / "out"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock_path(out).write_text(f"{gone.pid} {socket.gethostname()}\n")
    with caplog.at_level(logging.WARNING, logger="weightwise.io.artifacts"), output_lock(out):
        pass
    assert "no longer running" in caplog.text
    lock_path(out).write_text("")  # a writer is creating it right now: refused
    with pytest.raises(OutputError, match="starting up"):
        with output_lock(out):
            pass
    old = time.time() - 60  # ... or died while creating it long ago: taken over
    os.utime(lock_path(out), (old, old))
    with output_lock(out):
        pass
    assert not lock_path(out).exists()


def test_waiting_for_a_lock(tmp_path, holder):
    out, proc = holder
    start = time.monotonic()
    with pytest.raises(OutputError):
        with output_lock(out, wait=0.5):
            pass
    assert time.monotonic() - start >= 0.5


# --- unwritable outputs ------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_output_under_a_regular_file_fails_cleanly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write .*choose a writable location"):
        save(tiny_model(), blocker / "out")
    with pytest.raises(OutputError, match="cannot write"):
        write_bytes_atomic(blocker / "x.bin", b"data")
    assert blocker.read_text() == "not a folder" and _leftovers(tmp_path) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_fails_cleanly(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="Permission denied"):
            save(tiny_model(), parent / "out")
        with pytest.raises(OutputError, match="Permission denied"):
            write_bytes_atomic(parent / "x.bin", b"data")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_cli_unwritable_output(capsys, monkeypatch, tiny_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "out"
    code, _, err = run_cli(capsys, monkeypatch, "quantize", tiny_dir, "-f", "int8", "-g", "32", "-o", out)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: cannot write") and "Traceback" not in err


# --- text recognised by content ----------------------------------------------------------------


def test_text_file_without_extension_is_text(tmp_path):
    license_file = tmp_path / "LICENSE"
    license_file.write_text("Permission is hereby granted, free of charge, ... é ü\n" * 20, encoding="utf-8")
    assert corpus(str(license_file), "calib") == [license_file.read_text(encoding="utf-8")]
    rst = tmp_path / "notes.rst"
    rst.write_text("Title\n=====\n")
    assert corpus(str(rst)) == ["Title\n=====\n"]


def test_multibyte_character_cut_by_the_sniff_limit_is_text(tmp_path):
    path = tmp_path / "doc"
    path.write_bytes(b"a" * 1023 + "é".encode() + b" rest")  # é spans bytes 1023-1024
    assert corpus(str(path))[0].endswith("é rest")


@pytest.mark.parametrize("data", [b"\x00\x01\x02binary", b"\xff\xfe\xfa not utf-8", b"text" * 200 + b"\x00"])
def test_binary_file_given_as_text_is_refused(tmp_path, data):
    path = tmp_path / "weights.txt"
    path.write_bytes(data)
    with pytest.raises(WeightwiseError, match="weights.txt is a binary file"):
        corpus(str(path))


def test_invalid_utf8_after_the_sniffed_part(tmp_path):
    path = tmp_path / "doc.md"
    path.write_bytes(b"a" * 4096 + b"\xff")
    with pytest.raises(WeightwiseError, match="not valid UTF-8 .*byte 4096"):
        corpus(str(path))


def test_cli_binary_eval_text_is_one_error_line(capsys, monkeypatch, tiny_dir, tmp_path):
    out = tmp_path / "report"
    code, _, err = run_cli(capsys, monkeypatch, "eval", tiny_dir, "--text", tiny_dir / "model.safetensors", "-o", out)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines[-1].startswith("error: ") and "model.safetensors is a binary file" in lines[-1]
    assert "Traceback" not in err and not out.exists()
