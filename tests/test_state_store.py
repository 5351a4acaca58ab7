"""State documents: atomic, versioned, and refused when stale or foreign."""

import json
import os

from twisted.internet import reactor
from twisted.trial import unittest

from vdsm_twisted.state.store import (
    FORMAT_VERSION, StateError, StateStore, Writer, decode, encode)


class StoreTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        self.store = StateStore(self.dir, reactor=reactor)
        self.store.start()
        self.addCleanup(self.store.stop)

    def test_roundtrip_in_order(self):
        ds = [self.store.save("vm", "a", {"n": i}) for i in range(20)]
        d = ds[-1]

        def check(_):
            good, bad = self.store.load_all("vm")
            self.assertEqual(bad, [])
            self.assertEqual([(x.key, x.data) for x in good], [("a", {"n": 19})])
            self.assertTrue(good[0].same_process)
            self.assertTrue(good[0].same_boot)
            self.assertEqual(os.stat(os.path.join(self.dir, "vm", "a.json")).st_mode & 0o777, 0o600)
        return d.addCallback(check)

    def test_corrupt_truncated_foreign_and_stale_files_are_refused(self):
        vmdir = os.path.join(self.dir, "vm")
        os.makedirs(vmdir)
        good = encode("vm", "ok", {"x": 1})
        files = {
            "truncated.json": good[: len(good) // 2],
            "foreign.json": json.dumps({"hello": "world"}).encode(),
            "future.json": good.replace(b'"version":%d' % FORMAT_VERSION, b'"version":999'),
            "wrongkind.json": encode("net", "wrongkind", {}),
            "renamed.json": encode("vm", "other", {}),
            "binary.json": b"\xff\x00\xfe",
            "ok.json": good,
            "ok.json.tmp.123": b"half",
        }
        for name, data in files.items():
            with open(os.path.join(vmdir, name), "wb") as f:
                f.write(data)
        loaded, bad = self.store.load_all("vm")
        self.assertEqual([x.key for x in loaded], ["ok"])
        self.assertEqual(sorted(os.path.basename(p) for p, _ in bad),
                         sorted(n for n in files if n.endswith(".json") and n != "ok.json"))
        self.assertFalse(os.path.exists(os.path.join(vmdir, "ok.json.tmp.123")))

    def test_stale_writer_is_told_apart(self):
        stale = Writer(pid=1, start_time=5, boot_id="another-boot")
        loaded = decode(encode("vm", "k", {}, writer=stale))
        self.assertFalse(loaded.same_boot)
        self.assertFalse(loaded.same_process)

    def test_bad_keys(self):
        for key in ("", "../x", ".hidden", "a/b"):
            self.assertRaises(ValueError, self.store.save_now, "vm", key, {})

    def test_decode_errors(self):
        self.assertRaises(StateError, decode, b"[]")
        self.assertRaises(StateError, decode, encode("vm", "k", {}), "net")


def test_twistd_args_from_every_kind_of_launch():
    from vdsm_twisted.continuity.upgrade import exec_argv, twistd_args

    tail = ["--logfile", "/l", "vdsm", "--config", "/c"]
    assert twistd_args(["python", "-c", "code", *tail]) == tail
    assert twistd_args(["python", "-u", "/usr/bin/twistd", *tail]) == tail
    assert twistd_args(["python", "/run/x/launcher.py", "--handoff", "h", "--fallback", "f",
                        "--", *tail]) == tail
    assert exec_argv(["python", "/usr/bin/twistd", "--pidfile", "/p", "vdsm", "--config", "/c"]) \
        == ["--nodaemon", "--pidfile=", "vdsm", "--config", "/c"]
    assert exec_argv(["python", "/usr/bin/twistd", "-n", "--pidfile=/p", "-l", "/l", "vdsm"]) \
        == ["-l", "/l", "--nodaemon", "--pidfile=", "vdsm"]


def test_save_now_skips_a_document_already_on_disk(tmp_path):
    from vdsm_twisted.state.store import StateStore

    store = StateStore(str(tmp_path))
    path = tmp_path / "vm" / "a.json"
    assert store.save_now("vm", "a", {"x": 1}) is True
    mtime = path.stat().st_mtime_ns
    assert store.save_now("vm", "a", {"x": 1}) is False  # same bytes: not rewritten
    assert path.stat().st_mtime_ns == mtime
    assert store.save_now("vm", "a", {"x": 2}) is True
    # A document loaded from disk counts as written (an upgraded image's first handoff).
    fresh = StateStore(str(tmp_path))
    [loaded], _ = fresh.load_all("vm")
    assert loaded.data == {"x": 2}
    assert fresh.save_now("vm", "a", {"x": 2}) is False
    # Once removed, the same document is written again.
    fresh._remove_sync(str(path))
    assert not path.exists()
    assert fresh.save_now("vm", "a", {"x": 2}) is True
    assert path.exists()
