"""CURVE key files: ``esper-telemetry keygen`` and reading keys at attach."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
import zmq.auth

from esper_telemetry.certificates import write_key_pair
from esper_telemetry.collector.curve import load_client_keys

SCRIPT = Path(sys.executable).with_name("esper-telemetry")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keygen_command_writes_a_pair_with_a_private_secret(tmp_path) -> None:
    result = subprocess.run(
        [str(SCRIPT), "keygen", str(tmp_path), "rank0"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    public, secret = tmp_path / "rank0.key", tmp_path / "rank0.key_secret"
    assert mode(secret) == 0o600 and mode(public) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.key", "rank0.key_secret"]
    pub, none = zmq.auth.load_certificate(str(public))
    pub2, sec = zmq.auth.load_certificate(str(secret))
    assert none is None and pub == pub2 and len(sec) == 40
    assert zmq.curve_public(sec) == pub  # the pair belongs together


def test_keygen_creates_a_missing_directory_private_to_its_owner(tmp_path) -> None:
    # docs/deploy.md's example names a directory that does not exist yet.
    target = tmp_path / "etc" / "keys"
    result = subprocess.run(
        [str(SCRIPT), "keygen", str(target), "daemon"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert mode(target) == 0o700 and mode(target / "daemon.key_secret") == 0o600
    public, _ = zmq.auth.load_certificate(str(target / "daemon.key"))
    assert len(public) == 40


def test_keygen_refuses_a_file_where_the_directory_should_be(tmp_path) -> None:
    (tmp_path / "keys").write_text("not a directory\n")
    result = subprocess.run(
        [str(SCRIPT), "keygen", str(tmp_path / "keys"), "d"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "is not a directory" in result.stderr
    assert result.stderr.count("\n") == 1


def test_keygen_never_overwrites_and_says_so_in_one_line(tmp_path) -> None:
    write_key_pair(tmp_path, "d")
    before = (tmp_path / "d.key_secret").read_bytes()
    result = subprocess.run(
        [str(SCRIPT), "keygen", str(tmp_path), "d"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "not overwriting" in result.stderr
    assert (tmp_path / "d.key_secret").read_bytes() == before


def test_keygen_secret_is_never_readable_by_others_even_with_a_lax_umask(tmp_path) -> None:
    old = os.umask(0)
    try:
        _, secret = write_key_pair(tmp_path, "lax")
    finally:
        os.umask(old)
    assert mode(secret) == 0o600


def test_client_keys_are_read_from_certificate_files(tmp_path) -> None:
    server_public, _ = write_key_pair(tmp_path, "server")
    _, client_secret = write_key_pair(tmp_path, "client")
    keys = load_client_keys(server_public, client_secret)
    assert keys is not None
    assert keys.server_public == zmq.auth.load_certificate(str(server_public))[0]
    assert zmq.curve_public(keys.client.secret) == keys.client.public
    assert load_client_keys(None, None) is None


@pytest.mark.parametrize(
    "case, match",
    [
        ("only_server", "client_secret_key_file is missing"),
        ("missing_file", "server_public_key_file='.*nope.key': cannot read"),
        ("public_as_secret", "client_secret_key_file=.* holds no secret key"),
        ("not_a_certificate", "client_secret_key_file=.*cannot read"),
    ],
)
def test_bad_key_files_are_clear_errors_naming_the_argument(tmp_path, case, match) -> None:
    server_public, _ = write_key_pair(tmp_path, "server")
    client_public, client_secret = write_key_pair(tmp_path, "client")
    junk = tmp_path / "junk"
    junk.write_text("hello\n")
    args = {
        "only_server": (server_public, None),
        "missing_file": (tmp_path / "nope.key", client_secret),
        "public_as_secret": (server_public, client_public),
        "not_a_certificate": (server_public, junk),
    }[case]
    with pytest.raises(ValueError, match=match):
        load_client_keys(*args)


def test_attach_refuses_unreadable_keys_before_starting_anything(
    tmp_path, thread_names, monkeypatch
) -> None:
    import torch.nn as nn

    import esper_telemetry as et

    server_public, _ = write_key_pair(tmp_path, "server")
    before = thread_names()
    with pytest.raises(ValueError, match="client_secret_key_file is missing"):
        et.attach(
            groups={"g": nn.Linear(1, 1)},
            endpoint="tcp://127.0.0.1:9",
            server_public_key_file=str(server_public),
        )
    monkeypatch.setenv("ESPER_TELEMETRY_CLIENT_SECRET_KEY_FILE", str(tmp_path / "gone.key_secret"))
    with pytest.raises(
        ValueError,
        match="client_secret_key_file=.*gone.key_secret.*"
        r"\(from ESPER_TELEMETRY_CLIENT_SECRET_KEY_FILE\)",
    ):
        et.attach(
            groups={"g": nn.Linear(1, 1)},
            endpoint="tcp://127.0.0.1:9",
            server_public_key_file=str(server_public),
        )
    with pytest.raises(TypeError, match="server_public_key_file= takes a file path"):
        et.attach(
            groups={"g": nn.Linear(1, 1)},
            endpoint="tcp://127.0.0.1:9",
            server_public_key_file=b"bytes",
        )
    assert thread_names() == before
