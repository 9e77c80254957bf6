import socket

from lvmirror import sdnotify


def test_notify_without_service_manager_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


def test_notify_sends_one_datagram_with_every_assignment(monkeypatch, tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sdnotify.notify("READY=1", "STATUS=serving 2 LUNs") is True
        assert server.recv(4096) == b"READY=1\nSTATUS=serving 2 LUNs"


def test_notify_abstract_namespace(monkeypatch):
    name = "lvmirror-test-%d" % id(monkeypatch)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("STOPPING=1") is True
        assert server.recv(4096) == b"STOPPING=1"


def test_notify_to_a_vanished_socket_reports_failure(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sdnotify.notify("READY=1") is False
