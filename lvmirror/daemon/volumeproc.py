"""A process per volume (lvmirrord's default; ``--no-processes`` turns it off): each volume's
LUNs are served by a process of their own, so N busy volumes use N cores (a Python process runs
its bytecode on one core at a time).

lvmirrord (the netlink listener, the D-Bus service, the routing) starts one child per volume
when the first LUN of that volume appears, and ends it when its last LUN goes. The child runs a
``VolumeHost``: it opens the LUNs' uio devices and rings itself, so commands go from the
kernel's ring to the child and back with no hop through lvmirrord; lvmirrord only forwards
LUN events (add, remove, reconfigure) and management calls (split, resync, status, region
locks...) over a Unix socket. The data path makes no call to lvmirrord, let alone over D-Bus.

Failure handling, as tcmu-runner's handlers and md's ``mdmon`` are restarted:

* the child ends (a crash, a SIGKILL): lvmirrord logs it, fails the calls in flight with
  StateError, starts a new child and gives it the same devices with ``pickup`` (the ring may
  hold commands the dead child fetched and never completed: the new child answers them, as a
  restarted lvmirrord does). Restarts back off from 1 to 30 seconds. A LUN added meanwhile
  is given to the new child with the others, a LUN removed meanwhile is forgotten (the last
  one ends the volume process, and its restart starts none), and a region lock the dead
  child granted is reported lost rather than confused with the new child's locks;
* the child hangs (SIGSTOP, a deadlock): the read-only calls (status...) give up after
  ``CALL_TIMEOUT`` seconds with StateError, so status() leaves that volume out instead of
  waiting for ever;
* the zygote dies: volume processes are started as new Python processes from then on;
* lvmirrord is killed: the kernel kills its volume processes with it (``PR_SET_PDEATHSIG``),
  so a SIGKILL of lvmirrord is a crash of the whole data path, as it was with one process,
  and the next lvmirrord picks the devices up (a child still draining would hold the uio
  device while the new one resets the ring). A stop (SIGTERM) drains every volume process
  first; under systemd ``KillMode=mixed`` lets lvmirrord do that itself. A child whose
  socket closes kills itself the same way (the socket closes before the death signal comes).

The wire format is one message per frame: an 8-byte header (payload length, number of file
descriptors), then a pickle; descriptors (an emulated ring's socket and memory, for tests and
benchmarks) travel as SCM_RIGHTS with the header. Only lvmirrord and its own children hold
the socket pair, so nothing else can speak on it.
"""

from __future__ import annotations

import argparse
import array
import errno
import inspect
import itertools
import logging
import os
import pickle
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

from lvmirror.errors import ConfigError, LvmirrorError, StateError

log = logging.getLogger("lvmirrord")

__all__ = ["VolumeProcess", "MANAGEMENT_CALLS", "main"]

_HEADER = struct.Struct("<II")
MAX_FDS = 8
# the calls Lvmirrord forwards to the host of a volume (VolumeHost's methods of the same names)
MANAGEMENT_CALLS = ("status", "split", "backup", "backup_check", "begin_backup", "end_backup",
                    "resync", "restore", "restore_check",
                    "abandon_restore",
                    "attach", "detach",
                    "cancel", "lock_region", "unlock_region", "list_locks", "release_owner",
                    "volume_names", "lun_names", "remove_lun", "reconfigure_lun",
                    "split_prepare", "split_switch", "split_abort", "split_finish",
                    "hold_completions", "release_completions", "scrub", "cancel_scrub")
RESTART_BACKOFF = (1.0, 30.0)     # seconds: first delay, largest delay
STOP_TIMEOUT = 120.0              # seconds a child may take to end once its LUNs are drained
# the calls that only read: a child that has not answered one in CALL_TIMEOUT seconds (stopped,
# hung) is reported as not answering (StateError) rather than holding up status() for ever.
# The others (a resync that waits, a lock_region with its own timeout, a drain) take as long
# as they take.
READ_ONLY_CALLS = frozenset({"status", "volume_names", "lun_names", "list_locks"})
CALL_TIMEOUT = 10.0               # seconds


# -- framing ----------------------------------------------------------------------------------
def send_msg(sock: socket.socket, obj, fds=()) -> None:
    """Send ``obj`` (pickled) and ``fds`` as one frame. OSError when the peer is gone."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    data = _HEADER.pack(len(payload), len(fds)) + payload
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("peer closed the socket")
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket):
    """Receive one frame: (obj, fds). EOFError when the peer closed the socket."""
    fds = array.array("i")
    data, anc, _, _ = sock.recvmsg(_HEADER.size, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    if not data:
        raise EOFError("peer closed the socket")
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[:len(cdata) - (len(cdata) % fds.itemsize)])
    if len(data) < _HEADER.size:
        data += _recv_exact(sock, _HEADER.size - len(data))
    size, _nfds = _HEADER.unpack(data)
    return pickle.loads(_recv_exact(sock, size)), list(fds)


def _encode_error(exc: BaseException):
    """An exception as (module, class name, args, kwargs) for the other side to raise again
    (``_decode_error``); every part pickles. ``args`` is (message,), except for an OSError:
    (errno, strerror[, filename]) when it has an errno, else (message,). An OSError keeps its
    builtin subclass (TimeoutError, FileNotFoundError...); one of another module's subclass
    (ssl.SSLError...) becomes a plain OSError with its errno and message. ``kwargs``: an
    LvmirrorError's keyword-only constructor arguments kept as attributes of the same names
    (VolumeIOError's ``is_read`` and ``out_of_space``, which pick the SCSI sense), when they
    are None, bool, int, float or str."""
    cls = type(exc)
    if isinstance(exc, LvmirrorError):
        try:
            params = inspect.signature(cls.__init__).parameters.values()
        except (TypeError, ValueError):
            params = ()
        kwargs = {p.name: getattr(exc, p.name) for p in params
                  if p.kind is p.KEYWORD_ONLY and hasattr(exc, p.name)
                  and isinstance(getattr(exc, p.name), (type(None), bool, int, float, str))}
        return (cls.__module__, cls.__qualname__, (str(exc),), kwargs)
    if isinstance(exc, OSError):
        name = cls.__name__ if cls.__module__ == "builtins" else "OSError"
        if exc.errno is None:          # TimeoutError("...") of a region lock: no "[Errno None]"
            return ("builtins", name, (str(exc),))
        args = (exc.errno, exc.strerror or str(exc))
        if isinstance(exc.filename, (str, bytes)):
            args += (exc.filename,)
        return ("builtins", name, args)
    return (cls.__module__, cls.__qualname__, (str(exc),))


def _decode_error(module, name, args, kwargs=None) -> Exception:
    """The exception ``_encode_error`` described, to raise in lvmirrord as the child raised
    it: the builtin exceptions and lvmirror's own (any LvmirrorError subclass of an
    ``lvmirror`` module this process has imported: ``lvmirror.errors``'s, ``LockCancelled`` of
    ``lvmirror.mirror.regionlock``...) keep their class, so what handles them does not depend on
    the process that raised them (``except ConfigError`` and an OSError's errno choosing a
    netlink reply's status, a D-Bus reply's message: an LvmirrorError's alone, another error's
    after its class name), with their keyword-only arguments (``kwargs``: a VolumeIOError's
    ``is_read``). Anything else (another module's class, or an LvmirrorError whose constructor
    takes other positional arguments, such as ImageIOError) becomes an LvmirrorError whose
    message starts with the original class's name."""
    if module == "builtins":
        cls = getattr(sys.modules["builtins"], name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                return cls(*args)
            except Exception:
                pass
    elif module == "lvmirror" or module.startswith("lvmirror."):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, LvmirrorError):
            try:
                return cls(*args, **(kwargs or {}))
            except TypeError:     # a constructor with more arguments (ImageIOError...)
                pass
    return LvmirrorError(f"{name}: {args[0] if args else ''}")


# -- lvmirrord's side -------------------------------------------------------------------------
class _Spawner:
    """Starts the volume processes from one thread that lives as long as lvmirrord:
    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked a child ends, so a child started
    from a passing thread (a netlink event, a restart) would be killed with that thread."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = None
        self._lock = threading.Lock()

    def _loop(self):
        while True:
            argv, kwargs, slot = self._jobs.get()
            try:
                slot[1] = subprocess.Popen(argv, **kwargs)
            except BaseException as exc:
                slot[2] = exc
            slot[0].set()

    def popen(self, argv, **kwargs) -> subprocess.Popen:
        """``subprocess.Popen(argv, **kwargs)`` run on the spawner thread."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="volproc-spawner",
                                                daemon=True)
                self._thread.start()
        slot = [threading.Event(), None, None]
        self._jobs.put((argv, kwargs, slot))
        slot[0].wait()
        if slot[2] is not None:
            raise slot[2]
        return slot[1]


_spawner = _Spawner()


class _ChildGone(StateError):
    """No child answers the call: none runs (a restart is pending, or the process was stopped),
    or it ended before answering. Raised in lvmirrord only, never sent over the socket."""


class VolumeProcess:
    """lvmirrord's handle on the child process serving one volume's LUNs.

    It has the ``VolumeHost`` API (``add_lun``, ``remove_lun``, ``reconfigure_lun``,
    ``status``, the management calls, ``stop``); each call is sent to the child and waits for
    its answer, several at a time (a D-Bus caller waiting for a region lock does not hold up
    ``status``). Errors raised in the child are raised here with their class
    (``_decode_error``). StateError when the child is gone (it is being restarted, or was
    stopped).

    A child that ends unasked is restarted (``_restart``, from its reader thread) and given
    the devices again. While it restarts, ``add_lun`` records a new device for the new child to
    pick up with the others and ``remove_lun`` forgets one. ``stop`` ends a restart too: it
    interrupts the restart's backoff, and a child started meanwhile is stopped.

    Each child started is an incarnation (``incarnation`` counts them). A region lock belongs
    to the child that granted it and ends with it, and a new child numbers its locks from 1
    again: ``lock_region`` therefore returns (incarnation, the child's lock id), and
    ``unlock_region`` of another incarnation's lock raises ConfigError (the lock was lost when
    the process restarted) instead of releasing a lock the new child gave someone else."""

    def __init__(self, key: str, *, state_dir: str, workers: int = 4, inline_reads: bool = True,
                 log_level: str = "info", zygote: Zygote | None = None, leases=None):
        """``key``: the volume's name (what the child serves). ``zygote``: fork the child from
        it (lvmirrord's way: milliseconds); without one the child is a new Python process
        (``python -m lvmirror.daemon.volumeproc``: a second or more to import). ``leases``: a
        ``lease.LeaseConfig``; the child then holds its volume's sanlock lease."""
        self.key = key
        self.leases = leases
        self.zygote = zygote
        self.state_dir = state_dir
        self.workers = workers
        self.inline_reads = inline_reads
        self.log_level = log_level
        self.restarts = 0
        self.incarnation = 0            # children started so far: the running one's number
        self._started = 0.0
        self._delay = 0.0
        self._devices: dict = {}        # uio name -> (device, handle) to give a new child
        self._lun_lock = threading.Lock()      # one add, remove or pickup of a device at a time
        self._restarting = False               # a child ended; the next has not picked up all
        self._proc = None
        self._sock = None
        self._send_lock = threading.Lock()
        self._pending: dict[int, list] = {}    # call id -> [event, ok, value]
        self._ids = itertools.count(1)
        self._state_lock = threading.Lock()
        self._stopping = False
        self._ready = threading.Event()        # a child is running and answers
        self._restarter = None                 # the thread running _restart, if one does
        self._wake = threading.Event()         # set by stop(): ends a restart's backoff

    @property
    def pid(self) -> int | None:
        """The child's process id (None before start)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def restarting(self) -> bool:
        """Whether a child ended and its successor has not yet been given every device
        (and no stop came)."""
        with self._state_lock:
            return self._restarting and not self._stopping

    def start(self):
        """Start the child process: forked by the zygote, or, without one or once it is gone
        (the zygote logs that once), ``python -m lvmirror.daemon.volumeproc``. OSError when it
        cannot be started (the zygote alive but unable to fork: ECHILD)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = None
            zygote = self.zygote
            if zygote is not None and zygote.alive:
                try:
                    proc = _ForkedChild(zygote.spawn(child.fileno(), self.state_dir,
                                                     workers=self.workers,
                                                     inline_reads=self.inline_reads,
                                                     leases=self.leases))
                except OSError:
                    if zygote.alive:
                        raise
            if proc is None:
                proc = _spawner.popen(self._argv(child.fileno()), pass_fds=(child.fileno(),),
                                      env=self._env(), stdin=subprocess.DEVNULL)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self._run(proc, parent)

    def _env(self) -> dict:
        """A new Python child's environment: not systemd's notify socket, and a PYTHONPATH
        that imports the same lvmirror as this process (from the same site directory, the
        package's or a venv's, or else from the source tree this one came from)."""
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET",
                                                                  "WATCHDOG_USEC")}
        import lvmirror
        import site
        top = os.path.dirname(os.path.dirname(os.path.abspath(lvmirror.__file__)))
        sites = {os.path.abspath(d) for d in site.getsitepackages() + [site.getusersitepackages()]}
        if top not in sites:
            env["PYTHONPATH"] = os.pathsep.join([top] + [p for p in env.get("PYTHONPATH", "")
                                                         .split(os.pathsep) if p and p != top])
        return env

    def _argv(self, fd: int) -> list[str]:
        """A new Python child's command line, serving the socket ``fd``."""
        argv = [sys.executable, "-m", "lvmirror.daemon.volumeproc", "--fd", str(fd),
                "--parent", str(os.getpid()), "--volume", self.key, "--state-dir", self.state_dir,
                "--workers", str(self.workers), "--log-level", self.log_level]
        if not self.inline_reads:
            argv.append("--no-inline-reads")
        if self.leases is not None:
            argv += ["--lease-area", self.leases.area, "--host-id", str(self.leases.host_id),
                     "--lease-io-timeout", str(self.leases.io_timeout)]
        return argv

    def _run(self, proc, parent):
        with self._state_lock:
            self._proc, self._sock = proc, parent
            self.incarnation += 1
            self._started = time.monotonic()
            self._ready.set()
        threading.Thread(target=self._reader, args=(proc, parent),
                         name=f"volproc-{self.key}", daemon=True).start()
        log.info("volume %s: served by process %d", self.key, proc.pid)

    def call(self, method: str, *args, fds=(), **kwargs):
        """Run ``VolumeHost.<method>(*args, **kwargs)`` in the child and return its result
        (raising what it raised). StateError when no child is running (it is being restarted,
        or was stopped) or it ends before answering, and, for a call in ``READ_ONLY_CALLS``,
        when it has not answered in ``CALL_TIMEOUT`` seconds (the child is stopped or hung;
        a late answer is dropped)."""
        return self._call(method, args, kwargs, fds,
                          wait=CALL_TIMEOUT if method in READ_ONLY_CALLS else None)[1]

    def _call(self, method, args=(), kwargs=None, fds=(), *, wait=None, incarnation=None):
        """``call``, waiting at most ``wait`` seconds (None: as long as it takes) for the
        answer: StateError after that, the call forgotten. Returns (the incarnation of the
        child that answered, its result). ``incarnation``: only that child may run the call;
        ConfigError if it is not the one running (it ended: what it held is gone)."""
        slot = [threading.Event(), False, None]
        call_id = next(self._ids)
        with self._state_lock:       # the child the slot is failed for if it ends is this one
            ready = self._ready.is_set()
            if incarnation is not None and (incarnation != self.incarnation or not ready):
                raise ConfigError(f"volume {self.key}: the lock was lost when the volume's "
                                  f"process {'stopped' if self._stopping else 'restarted'}")
            if not ready:
                raise _ChildGone(f"the process serving volume {self.key} " + (
                    "was stopped" if self._stopping else "is restarting; try again"))
            sock, current = self._sock, self.incarnation
            self._pending[call_id] = slot
        try:
            with self._send_lock:
                send_msg(sock, ("call", call_id, method, args, kwargs or {}), fds)
        except OSError:
            with self._state_lock:
                self._pending.pop(call_id, None)
            raise _ChildGone(f"the process serving volume {self.key} is gone") from None
        if not slot[0].wait(wait):
            with self._state_lock:
                mine = self._pending.pop(call_id, None)
            if mine is not None:      # else the answer came meanwhile: it is being set
                raise StateError(f"the process serving volume {self.key} does not answer")
            slot[0].wait()
        if slot[1]:
            return current, slot[2]
        raise slot[2]

    def _reader(self, proc, sock):
        while True:
            try:
                msg, _ = recv_msg(sock)
            except (EOFError, OSError):
                break
            _, call_id, ok, value = msg
            with self._state_lock:
                slot = self._pending.pop(call_id, None)
            if slot is not None:
                slot[1], slot[2] = ok, value if ok else _decode_error(*value)
                slot[0].set()
        me = threading.current_thread()
        with self._state_lock:
            self._ready.clear()
            pending, self._pending = self._pending, {}
            restart = not self._stopping
            if restart:
                self._restarter = me
                self._restarting = True
        for slot in pending.values():
            slot[1], slot[2] = False, _ChildGone(
                f"the process serving volume {self.key} ended")
            slot[0].set()
        sock.close()
        rc = proc.wait()
        if not restart:
            return
        how = "status unknown" if rc is None else \
            f"signal {-rc}" if rc < 0 else f"exit status {rc}"
        log.error("volume %s: its process %d ended (%s); starting a new one, which picks up "
                  "its %d LUN(s)", self.key, proc.pid, how, len(self._devices))
        try:
            self._restart()
        finally:
            with self._state_lock:
                if self._restarter is me:
                    self._restarter = None

    def _restart(self):
        """Start a new child and give it the devices (pickup). The first restart is at once;
        a child that ends within ``RESTART_BACKOFF[1]`` seconds of its start doubles the delay
        before the next one (from ``RESTART_BACKOFF[0]`` up to ``RESTART_BACKOFF[1]``). A
        ``stop`` ends the wait at once and no child is started; a child started while ``stop``
        came is stopped."""
        lived = time.monotonic() - self._started
        if self.restarts == 0 or lived > RESTART_BACKOFF[1]:
            self._delay = 0.0
        else:
            self._delay = min(max(self._delay * 2, RESTART_BACKOFF[0]), RESTART_BACKOFF[1])
        while True:
            if self._wake.wait(self._delay):
                return                          # stop() came during the backoff
            with self._state_lock:
                if self._stopping:
                    return
            self.restarts += 1
            try:
                self.start()
                break
            except OSError as exc:
                log.error("volume %s: restarting its process failed: %s", self.key, exc)
                self._delay = min(max(self._delay * 2, RESTART_BACKOFF[0]), RESTART_BACKOFF[1])
        with self._state_lock:
            stopping = self._stopping
        if stopping:                            # stop() came while the child started
            self._stop_child(STOP_TIMEOUT)
            return
        self._pickup()

    def _pickup(self):
        """Give the new child every device, one at a time, until none is left that it has not
        been given: those added while this runs too (``add_lun`` records them under the same
        lock). A device the child cannot open is logged and left, as at lvmirrord's start.
        Ends early on ``stop``, or when this child ends too (its own restart picks up)."""
        me = threading.current_thread()
        given = set()
        while True:
            with self._lun_lock:
                with self._state_lock:
                    if self._stopping or self._restarter is not me:
                        return
                    todo = next(((u, dev, h) for u, (dev, h) in self._devices.items()
                                 if u not in given), None)
                    if todo is None:
                        self._restarting = False    # add_lun goes to the child from now
                        return
                uio_name, device, handle = todo
                given.add(uio_name)
                try:
                    self._add(device, pickup=True, handle=handle)
                except _ChildGone:
                    pass                            # this child ended too: it is restarted
                except Exception as exc:
                    log.error("volume %s: cannot pick up %s (%s) again: %s", self.key,
                              device.dev_name, device.uio_name, exc,
                              exc_info=not isinstance(exc, (OSError, LvmirrorError)))

    def _add(self, device, *, pickup, handle):
        fds, meta = handle.transfer() if handle is not None else ((), None)
        return self.call("add_lun", device, pickup=pickup, fds=fds, handle_meta=meta)

    def add_lun(self, device, *, pickup: bool = False, handle=None) -> dict:
        """``VolumeHost.add_lun`` in the child: serve ``device`` (a ``uio.UioDevice``);
        ``handle``: an open ring offering ``transfer()`` (the ring emulator's), or None for the
        child to open the uio device. Returns ``{"name", "uio", "error"}`` (``error``: why the
        LUN answers NOT READY, or None). The device is remembered for a restarted child.

        While the child restarts (or when it ends during this call) the device is only
        recorded: the restart gives it to the new child with the others (with ``pickup``),
        and this returns ``error`` None at once (a failure to open it then is logged). OSError
        when the child cannot open the device; StateError after ``stop``."""
        with self._lun_lock:
            with self._state_lock:
                if self._stopping:
                    raise _ChildGone(f"the process serving volume {self.key} was stopped")
                deferred = self._restarting
            info = None
            if not deferred:
                try:
                    info = self._add(device, pickup=pickup, handle=handle)
                except _ChildGone:          # it ended: unless stopped, it is being restarted
                    with self._state_lock:
                        if self._stopping:
                            raise
            self._devices[device.uio_name] = (device, handle)
        if info is None:
            log.info("volume %s: LUN %s (%s) is served once its process has restarted",
                     self.key, device.dev_name, device.uio_name)
            info = {"name": device.dev_name, "uio": device.uio_name, "error": None}
        return info

    def remove_lun(self, uio_name: str) -> bool:
        """Stop serving the device ``uio_name``: forget it (a restart no longer picks it up)
        and have the child, if one runs, drain and release it (``VolumeHost.remove_lun``).
        Returns whether it was given to this process. Forgotten even when no child runs or the
        child ends meanwhile; errors of the child's ``remove_lun`` are raised."""
        with self._lun_lock:
            known = self._devices.pop(uio_name, None) is not None
            try:
                self.call("remove_lun", uio_name)
            except _ChildGone:
                pass                    # no child holds it; none will be given it
        return known

    def lock_region(self, name, lba, count, *, shared=False, timeout=None, owner):
        """``VolumeHost.lock_region`` in the child: lock ``count`` blocks at ``lba`` of volume
        ``name`` for ``owner``, waiting at most ``timeout`` seconds (None: as long as it takes;
        TimeoutError after). Returns the lock's id, (incarnation, the child's lock id), for
        ``unlock_region``. ConfigError as VolumeHost raises it; StateError when no child runs
        or it ends meanwhile (the lock, if granted, ended with it)."""
        return self._call("lock_region", (name, lba, count),
                          dict(shared=shared, timeout=timeout, owner=owner))

    def unlock_region(self, lock_id, *, owner):
        """Release the lock ``lock_id`` (from ``lock_region``: (incarnation, the child's lock
        id)) held by ``owner``. ConfigError when ``owner`` does not hold it, or when it was
        granted by a child that has ended since (the lock was lost when the volume's process
        restarted or stopped)."""
        try:
            incarnation, local_id = lock_id
        except (TypeError, ValueError):
            raise ConfigError(f"no lock {lock_id!r} held by {owner}") from None
        self._call("unlock_region", (local_id,), dict(owner=owner), incarnation=incarnation)

    def list_locks(self, name) -> dict:
        """``VolumeHost.list_locks`` in the child (a read-only call: StateError after
        ``CALL_TIMEOUT`` seconds without an answer), its ``external_lock_ids`` given as
        ``lock_region`` returns them: (incarnation, the child's lock id)."""
        incarnation, info = self._call("list_locks", (name,), wait=CALL_TIMEOUT)
        info["external_lock_ids"] = [(incarnation, lid) for lid in info["external_lock_ids"]]
        return info

    def serves(self) -> bool:
        """Whether any LUN is still given to this process (its restart included)."""
        return bool(self._devices)

    def stop(self, timeout: float = STOP_TIMEOUT):
        """Stop for good, whatever the state: a pending restart starts no child (its backoff
        ends at once); a running child stops every LUN (each drains and completes its in-flight
        commands) and ends, SIGKILLed if it has not ended ``timeout`` seconds after it answered
        (the drain itself has no time limit). A restart starting a child as ``stop`` comes is
        waited for up to ``timeout`` seconds; the child it started is stopped the same way.
        Returns at once when no child runs; raises nothing but what a failing ``kill`` would."""
        with self._state_lock:
            self._stopping = True
            restarter = self._restarter
        self._wake.set()
        if restarter is not None and restarter is not threading.current_thread():
            restarter.join(timeout)     # it starts no child now, or stops the one it started
        self._stop_child(timeout)

    def _stop_child(self, timeout: float):
        """Ask the running child, if any, to stop (it answers once its LUNs are drained) and
        wait for it to end; SIGKILL it if it has not ``timeout`` seconds after answering."""
        with self._state_lock:
            proc = self._proc if self._ready.is_set() else None
        if proc is None:
            return
        try:
            self._call("stop")
        except LvmirrorError:
            pass                        # it ended already
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("volume %s: its process %d did not stop in %.0f s; killed", self.key,
                      proc.pid, timeout)
            proc.kill()
            proc.wait()


def _pid_gone(pid: int) -> bool:
    """Whether process ``pid`` has ended: not there at all, or a zombie with no thread left.

    A zombie thread-group leader alone is not an end: the leader exits first, and another
    thread of the process still runs until it leaves the kernel - a worker blocked in a write
    to a device that stopped answering does so only once the write returns, SIGKILL or not.
    Until then the write may still land, so the next process for the volume must not start
    (``legs.left_behind`` counts such writes only within one process): the process has ended
    once ``/proc/PID/task`` holds the leader alone (or nothing)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:      # bytes: the name may be any
            if f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X"):
                return False
        return len(os.listdir(f"/proc/{pid}/task")) <= 1
    except (FileNotFoundError, ProcessLookupError):
        return True


class _ForkedChild:
    """A volume process forked by the zygote (not lvmirrord's child: the zygote reaps it), with
    the part of ``subprocess.Popen`` VolumeProcess uses."""

    def __init__(self, pid: int):
        self.pid = pid

    def _gone(self) -> bool:
        return _pid_gone(self.pid)

    def wait(self, timeout: float | None = None):
        """Wait until the process has ended (its descriptors, the uio device's among them,
        closed); returns None (its status went to the zygote). TimeoutExpired after
        ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._gone():
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"volume process {self.pid}", timeout)
            time.sleep(0.02)
        return None

    def kill(self):
        """SIGKILL it."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _forward(name):
    def method(self, *args, **kwargs):
        return self.call(name, *args, **kwargs)
    method.__name__ = name
    method.__doc__ = f"``VolumeHost.{name}`` run in the volume's process."
    return method


for _name in MANAGEMENT_CALLS:
    if not hasattr(VolumeProcess, _name):
        setattr(VolumeProcess, _name, _forward(_name))


# -- the child's side -------------------------------------------------------------------------
# How long (seconds) a thread that ran lvmirrord's calls waits for the next one before it ends.
CALL_THREAD_IDLE = 30.0


class CallThreads:
    """Threads that run calls, as many as run at once and no more: a call goes to a thread
    waiting for one, or to a new thread when none waits; a thread with no call for
    ``idle_timeout`` seconds ends. A call may block as long as it likes (a ``wait`` for a
    resync) without holding up the others, as with a thread per call, but the status the
    D-Bus service reads once a second no longer starts a thread each time (answering those
    calls, a thread started for each, was about a quarter of an idle handler's py-spy samples
    in the lab, 2026-12-03; on the host the change saves nothing measurable).
    ``post(fn, *args)`` runs ``fn(*args)``; an Exception it raises is logged and ends nothing.
    (A ``queue.Queue``, not a SimpleQueue: CPython 3.11's ``SimpleQueue.get(timeout=...)``
    can wait past its timeout until the next put when two waiters race for one item.)"""

    def __init__(self, name: str, idle_timeout: float = CALL_THREAD_IDLE):
        self.name = name
        self.idle_timeout = idle_timeout
        self._q: queue.Queue = queue.Queue()
        self._mu = threading.Lock()
        # threads waiting for a call (or started for one) less the calls queued: never < 0
        self._waiting = 0
        self.started = 0         # threads started so far

    def post(self, fn, *args) -> None:
        """Run ``fn(*args)`` on a waiting thread, else on a new one. RuntimeError (from
        ``Thread.start``) when none waits and no thread can be started: then nothing was
        queued and the call never runs."""
        with self._mu:
            if self._waiting > 0:
                self._waiting -= 1
            else:
                threading.Thread(target=self._run, name=f"{self.name}-{self.started + 1}",
                                 daemon=True).start()
                self.started += 1
            self._q.put((fn, args))

    def _run(self):
        get = self._q.get
        while True:
            try:
                fn, args = get(timeout=self.idle_timeout)
            except queue.Empty:
                with self._mu:
                    # a call queued while this thread timed out is counted against a waiting
                    # thread: this one takes it; with none queued it is one waiter fewer
                    try:
                        fn, args = self._q.get_nowait()
                    except queue.Empty:
                        self._waiting -= 1
                        return
            try:
                fn(*args)
            except Exception:      # (anything else ends the thread, as it ended the call's own)
                log.exception("%s: unexpected error", threading.current_thread().name)
            with self._mu:
                self._waiting += 1


class _ChildServer:
    """Answers lvmirrord's calls on ``sock`` with ``host``'s methods, each on a thread of its
    own while it runs (``CallThreads``)."""

    def __init__(self, sock, host):
        self.sock = sock
        self.host = host
        self._send_lock = threading.Lock()
        self._stop_id = None
        self._threads = CallThreads("volume-call")

    def _reply(self, call_id, ok, value):
        try:
            with self._send_lock:
                send_msg(self.sock, ("reply", call_id, ok, value))
        except OSError:
            pass            # lvmirrord is gone: the main loop sees EOF and stops

    def _run(self, call_id, method, args, kwargs, fds):
        try:
            if method == "add_lun":
                meta = kwargs.pop("handle_meta", None)
                if fds:
                    from lvmirror.tcmu.emulator import AttachedHandle
                    kwargs["handle"] = AttachedHandle(fds, meta)
            elif method not in MANAGEMENT_CALLS:
                raise LvmirrorError(f"unknown call {method!r}")
            result = getattr(self.host, method)(*args, **kwargs)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                raise
            if not isinstance(exc, LvmirrorError):
                log.debug("volume process: %s failed", method, exc_info=True)
            self._reply(call_id, False, _encode_error(exc))
        else:
            self._reply(call_id, True, result)

    def serve(self):
        """Serve until lvmirrord says stop (then stop every LUN: each drains and completes its
        in-flight commands) or goes away (then die at once, SIGKILL)."""
        try:
            while True:
                try:
                    (_, call_id, method, args, kwargs), fds = recv_msg(self.sock)
                except (EOFError, OSError):
                    # lvmirrord is gone (killed: the kernel's death signal is on its way): go
                    # as a crash goes, at once, leaving the ring to the next lvmirrord's
                    # pickup; draining here would race that pickup's ring reset
                    os.kill(os.getpid(), signal.SIGKILL)
                if method == "stop":
                    self._stop_id = call_id
                    break
                self._threads.post(self._run, call_id, method, args, kwargs, fds)
        finally:
            self.host.stop()
            if self._stop_id is not None:
                self._reply(self._stop_id, True, None)


def _die_with_parent(parent: int):
    """Ask the kernel to SIGKILL this process when lvmirrord (pid ``parent``) dies
    (prctl(2) PR_SET_PDEATHSIG); exit at once if it died already."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("volume process: PR_SET_PDEATHSIG: %s", os.strerror(ctypes.get_errno()))
    if os.getppid() != parent:
        os._exit(0)


def main(argv=None):
    """The child process's entry point (started by ``VolumeProcess.start``)."""
    from lvmirror.daemon.main import setup_logging
    ap = argparse.ArgumentParser(prog="lvmirrord-volume")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--parent", type=int, default=0,
                    help="lvmirrord's pid: this process dies with it (PR_SET_PDEATHSIG)")
    ap.add_argument("--volume", required=True)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--no-inline-reads", action="store_true")
    ap.add_argument("--lease-area")
    ap.add_argument("--host-id", type=int)
    ap.add_argument("--lease-io-timeout", type=int, default=10)
    args = ap.parse_args(argv)
    setup_logging(args.log_level)
    if args.parent:
        _die_with_parent(args.parent)
    leases = None
    if args.lease_area:
        from lvmirror.daemon.lease import LeaseConfig
        leases = LeaseConfig(args.lease_area, args.host_id, args.lease_io_timeout)
    return _serve_child(socket.socket(fileno=args.fd), args.state_dir, workers=args.workers,
                        inline_reads=not args.no_inline_reads, leases=leases)


def _serve_child(sock, state_dir, *, workers, inline_reads, leases=None) -> int:
    """A volume process's life: a VolumeHost answering lvmirrord on ``sock`` until stopped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # a terminal's ^C is lvmirrord's to handle

    def on_term(*_):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, on_term)
    from lvmirror.daemon.host import VolumeHost
    host = VolumeHost(state_dir, workers=workers, inline_reads=inline_reads, leases=leases)
    try:
        _ChildServer(sock, host).serve()
    except SystemExit:
        host.stop()
    return 0


# -- the zygote: volume processes forked, not started from scratch -----------------------------
class Zygote:
    """A process forked from lvmirrord before it starts any thread, with everything imported,
    that forks the volume processes on request (as Android's zygote and multiprocessing's
    forkserver do). A new volume process is then ready in milliseconds instead of a Python
    start and its imports (seconds under emulation): what lets a restarted lvmirrord answer its
    LUNs' queued commands before the initiators' 30-second command timeout.

    Forking lvmirrord itself once its netlink and D-Bus threads run would copy locks those
    threads may hold; the zygote has one thread. It dies with lvmirrord, its children die with
    it (PR_SET_PDEATHSIG both), and it reaps them itself (SIGCHLD ignored). Should it die
    anyway (killed, out of memory), ``alive`` turns False, ``spawn`` raises OSError (ECHILD),
    and ``VolumeProcess.start`` starts new Python processes instead."""

    def __init__(self):
        """Fork the zygote now (call with one thread running). OSError if fork fails."""
        parent_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        lvmirrord = os.getpid()
        pid = os.fork()
        if pid == 0:                      # the zygote
            code = 1
            try:
                parent_end.close()
                _die_with_parent(lvmirrord)
                code = _zygote_loop(zygote_end)
            finally:
                os._exit(code)
        zygote_end.close()
        self.pid = pid
        self._sock = parent_end
        self._lock = threading.Lock()           # one spawn at a time on the socket
        self._dead_lock = threading.Lock()
        self._dead = False                      # gone (found dead, or closed)

    @property
    def alive(self) -> bool:
        """Whether the zygote can still fork volume processes: False once it was found dead
        (a spawn failed on its socket, or its process has ended) or closed."""
        if not self._dead and _pid_gone(self.pid):
            self._mark_dead("its process has ended")
        return not self._dead

    def _mark_dead(self, why: str):
        """The zygote is gone: say so once (volume processes start the slow way from now)."""
        with self._dead_lock:
            if self._dead:
                return
            self._dead = True
        log.error("the zygote process %d is gone (%s): volume processes are started as new "
                  "Python processes from now on, which takes seconds instead of milliseconds",
                  self.pid, why)

    def spawn(self, sock_fd: int, state_dir: str, *, workers: int, inline_reads: bool,
              leases=None) -> int:
        """Fork a volume process serving the socket ``sock_fd`` (passed by SCM_RIGHTS); returns
        its pid. OSError (ECHILD) when the zygote is gone (``alive`` is False from then on) or
        could not fork."""
        with self._lock:
            if self._dead:
                raise OSError(errno.ECHILD, "the zygote process is gone")
            try:
                send_msg(self._sock, (state_dir, workers, inline_reads, leases), [sock_fd])
                (ok, value), _ = recv_msg(self._sock)
            except (EOFError, OSError) as exc:
                self._mark_dead(f"its socket: {exc}")
                raise OSError(errno.ECHILD, "the zygote process is gone") from None
        if not ok:
            raise OSError(errno.ECHILD, f"the zygote could not fork: {value}")
        return value

    def close(self):
        """End the zygote: it sees its socket close and exits, and the kernel then SIGKILLs
        every volume process it forked that still runs (their ``PR_SET_PDEATHSIG`` names the
        zygote), so stop those first. The zygote is this process's child: reap it
        (``os.waitpid(zygote.pid, 0)``). ``alive`` is False after."""
        with self._dead_lock:
            self._dead = True
        self._sock.close()


def _zygote_loop(sock) -> int:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)     # children are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    zygote = os.getpid()
    while True:
        try:
            (state_dir, workers, inline_reads, leases), fds = recv_msg(sock)
        except (EOFError, OSError):
            return 0                                  # lvmirrord closed it or is gone
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            send_msg(sock, (False, str(exc)))
            continue
        if pid == 0:                                  # the volume process
            code = 1
            try:
                sock.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _die_with_parent(zygote)
                code = _serve_child(socket.socket(fileno=fds[0]), state_dir, workers=workers,
                                    inline_reads=inline_reads, leases=leases)
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        send_msg(sock, (True, pid))


if __name__ == "__main__":
    sys.exit(main())
