"""Signed artifacts: Ed25519 over the manifest; every way of tampering is refused before loading."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import starlift
from starlift.core.artifact import write_manifest
from starlift.core.errors import ArtifactError, UsageError
from starlift.export import export_checkpoint
from tests.conftest import write_hf_checkpoint

pytest.importorskip("cryptography", reason="signatures need the cryptography package (the sign extra)")

from starlift.core.signing import SIGNATURE, generate_keypair, sign_artifact  # noqa: E402

pytestmark = pytest.mark.slow  # the slow tier: `make test-slow` (CI runs both)


def _cli(*args):
    exe = Path(sys.executable).with_name("starlift")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    good = generate_keypair(root / "build.key")
    other = generate_keypair(root / "other.key")
    return {"good": root / "build.key", "good_pub": root / "build.key.pub", "other": root / "other.key",
            "other_pub": root / "other.key.pub", "fingerprint": good["fingerprint"], "other_fp": other["fingerprint"]}


@pytest.fixture(scope="module")
def signed(tmp_path_factory, keys):
    """One tiny artifact exported with --sign-key; tests copy it before damaging it."""
    root = tmp_path_factory.mktemp("signed")
    ckpt = write_hf_checkpoint(root / "ckpt", seed=4)
    export_checkpoint(ckpt, root / "art", progress=False, sign_key=keys["good"])
    export_checkpoint(ckpt, root / "art2", progress=False, validate_steps=2)
    sign_artifact(root / "art2", keys["good"])
    return root


@pytest.fixture
def art(signed, tmp_path):
    shutil.copytree(signed / "art", tmp_path / "art")
    return tmp_path / "art"


def test_keygen_writes_a_private_key_only_its_owner_can_read(keys):
    assert stat.S_IMODE(keys["good"].stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in keys["good"].read_bytes()
    assert b"PUBLIC KEY" in keys["good_pub"].read_bytes()
    assert keys["fingerprint"].startswith("SHA256:") and keys["fingerprint"] != keys["other_fp"]
    with pytest.raises(UsageError, match="exists"):
        generate_keypair(keys["good"])


def test_signed_artifact_verifies_and_loads_with_the_right_key(art, keys):
    record = json.loads((art / SIGNATURE).read_text())
    assert record["key_fingerprint"] == keys["fingerprint"] and record["scheme"] == "ed25519"
    gen = starlift.load(art, public_key=keys["good_pub"])
    out = gen.generate([1, 2, 3], max_new_tokens=4)
    assert len(out) == 4 and all(0 <= t < 99 for t in out)
    gen.close()
    trust_dir = art.parent / "trusted"
    trust_dir.mkdir()
    shutil.copy(keys["other_pub"], trust_dir / "other.pub")
    shutil.copy(keys["good_pub"], trust_dir / "build.pub")
    starlift.load(art, public_key=trust_dir).close()  # a folder of trusted keys
    proc = _cli("verify", art, "--public-key", keys["good_pub"])
    assert proc.returncode == 0 and "signature OK" in proc.stdout, proc.stderr


def _refused(art, pub, match):
    with pytest.raises(ArtifactError, match=match):
        starlift.load(art, public_key=pub)
    proc = _cli("verify", art, "--public-key", pub)
    assert proc.returncode == 1, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], proc.stderr


def test_another_key_is_refused(art, keys):
    _refused(art, keys["other_pub"], "not among the trusted keys")


def test_unsigned_artifact_is_refused_with_a_key_and_loads_without(art, keys):
    (art / SIGNATURE).unlink()
    _refused(art, keys["good_pub"], "is not signed")
    starlift.load(art).close()  # without a key: hashes only, as before


def test_changed_file_with_rewritten_manifest_is_refused(art, keys):
    data = art / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one weight changed...
    data.write_bytes(bytes(raw))
    manifest = json.loads((art / "manifest.json").read_text())
    info = {k: v for k, v in manifest.items() if k not in ("format", "files")}
    write_manifest(art, info)  # ...and the manifest's hashes rewritten to match, as an attacker would
    starlift.load(art).close()  # hashes alone cannot tell
    _refused(art, keys["good_pub"], "does not match manifest.json")


def test_signature_from_another_artifact_is_refused(art, signed, keys):
    shutil.copy(signed / "art2" / SIGNATURE, art / SIGNATURE)  # a valid signature, of another manifest
    _refused(art, keys["good_pub"], "does not match manifest.json")


def test_a_file_the_manifest_does_not_list_is_refused(art, keys):
    (art / "extra.onnx").write_bytes(b"not listed")
    _refused(art, keys["good_pub"], "does not list")


def test_damaged_signature_file_is_refused(art, keys):
    record = json.loads((art / SIGNATURE).read_text())
    record["signature"] = record["signature"][:-4] + "AAA="
    (art / SIGNATURE).write_text(json.dumps(record))
    _refused(art, keys["good_pub"], "does not match")
    (art / SIGNATURE).write_text("{not json")
    _refused(art, keys["good_pub"], "not valid JSON")


def test_cli_keygen_sign_and_generate(tmp_path, signed):
    key = tmp_path / "k"
    proc = _cli("keygen", key)
    assert proc.returncode == 0 and "SHA256:" in proc.stdout, proc.stderr
    shutil.copytree(signed / "art2", tmp_path / "a")
    (tmp_path / "a" / SIGNATURE).unlink()
    proc = _cli("sign", tmp_path / "a", "--key", key)
    assert proc.returncode == 0, proc.stderr
    proc = _cli("generate", tmp_path / "a", "--prompt", "x", "--public-key", f"{key}.pub")
    assert proc.returncode == 2 and "no tokenizer" in proc.stderr  # the key was accepted; tiny has no tokenizer
    proc = _cli("generate", tmp_path / "a", "--prompt", "x", "--public-key", f"{key}")
    assert proc.returncode == 2 and "private key" in proc.stderr
    proc = _cli("sign", tmp_path / "a", "--key", f"{key}.pub")
    assert proc.returncode == 2 and "not a PEM private key" in proc.stderr


def test_export_with_a_bad_key_fails_before_any_work(tmp_path, signed):
    bad = tmp_path / "bad.key"
    bad.write_text("nope")
    with pytest.raises(UsageError, match="not a PEM private key"):
        export_checkpoint(signed / "ckpt", tmp_path / "out", progress=False, sign_key=bad)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [bad]
