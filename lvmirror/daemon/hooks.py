"""Split hooks: programs lvmirrord runs before and after a split, for application-consistent
copies (freeze a file system or quiesce a database on the initiator side, split, thaw).

The hooks are the executables in the hooks directory (``/etc/lvmirror/hooks.d``, lvmirrord
``--hooks-dir``), run one after the other in the C locale's order of their names, as
``run-parts`` runs a directory (names of letters, digits, ``_`` and ``-`` only; anything else,
a backup file ``x~`` or ``x.dpkg-old`` say, is skipped). Each is run as::

    HOOK pre-split      before the split (for a consistency group: once, around the group)
    HOOK post-split     after it, also when the split failed or a pre-split hook aborted it,
                        so that whatever the pre-split hook froze is always thawed

with the environment of lvmirrord plus:

==========================  ==================================================================
``LVMIRROR_PHASE``          ``pre-split`` or ``post-split``
``LVMIRROR_VOLUMES``        the volumes, space-separated (``db wal``)
``LVMIRROR_IMAGES``         ``VOLUME:IMAGE`` of each, space-separated (``db:2 wal:2``)
``LVMIRROR_GROUP``          ``1`` for a consistency group's split, else ``0``
``LVMIRROR_RESULT``         post-split only: ``ok``, or ``failed: <why>``
``LVMIRROR_SPLIT_TIME``     post-split only, when it succeeded: T, seconds since the epoch
==========================  ==================================================================

A hook that runs longer than its timeout (seconds, 30 by default, per split call) is killed
(SIGKILL to its process group) and counts as failed. A hook is done when it exits: a process it
left running in the background (``ssh -f``) does not hold the split up. When a pre-split hook fails, the split is
aborted (the default, ``on_error="abort"``: HookError with the hook's name, exit status and the
last line it wrote) or goes on (``on_error="continue"``: the failure is logged and reported).
A post-split hook's failure never undoes the split; it is logged and reported. Each hook's
output goes to lvmirrord's log (the journal) and its last lines into the result.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import tempfile
import time

from lvmirror.errors import ConfigError, LvmirrorError

log = logging.getLogger("lvmirrord")

__all__ = ["DEFAULT_HOOKS_DIR", "DEFAULT_TIMEOUT", "HookError", "SplitHooks", "hook_options"]

DEFAULT_HOOKS_DIR = "/etc/lvmirror/hooks.d"
DEFAULT_TIMEOUT = 30.0
ON_ERROR = ("abort", "continue")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")         # run-parts' default (LANANA) names
OUTPUT_KEEP = 4096                              # bytes of a hook's output kept in the result


class HookError(LvmirrorError):
    """A pre-split hook failed and the policy is to abort the split."""


def hook_options(options: dict | None) -> dict:
    """The hook options of a split call, checked: ``hooks`` (bool, run them: default True),
    ``hook_timeout`` (seconds > 0, default DEFAULT_TIMEOUT), ``on_hook_error`` ("abort", the
    default, or "continue"). ConfigError on an unknown option or a bad value."""
    options = dict(options or {})
    out = dict(hooks=True, hook_timeout=DEFAULT_TIMEOUT, on_hook_error="abort")
    for key, value in options.items():
        if key == "hooks":
            out[key] = bool(value)
        elif key == "hook_timeout":
            try:
                value = float(value)
            except (TypeError, ValueError):
                value = -1.0
            if not 0 < value <= 3600:
                raise ConfigError(f"hook_timeout must be seconds in (0, 3600], got {options[key]!r}")
            out[key] = value
        elif key == "on_hook_error":
            if value not in ON_ERROR:
                raise ConfigError(f"on_hook_error must be one of {', '.join(ON_ERROR)}, got "
                                  f"{value!r}")
            out[key] = str(value)
        else:
            raise ConfigError(f"unknown split option {key!r} (known: hooks, hook_timeout, "
                              f"on_hook_error)")
    return out


class SplitHooks:
    """The hooks of one hooks directory (see the module docstring)."""

    def __init__(self, directory: str = DEFAULT_HOOKS_DIR):
        self.directory = directory

    def programs(self) -> list[str]:
        """The hooks to run, in order (paths); none when the directory does not exist."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigError(f"hooks directory {self.directory}: {exc.strerror}") from exc
        out = []
        for name in names:
            path = os.path.join(self.directory, name)
            if _NAME.match(name) and os.path.isfile(path) and os.access(path, os.X_OK):
                out.append(path)
        return out

    def run(self, phase: str, members, *, timeout: float, result: str | None = None,
            split_time: float | None = None) -> list[dict]:
        """Run every hook for ``phase`` ("pre-split" / "post-split") of a split of
        ``members`` ((volume, image) pairs); returns one dict per hook: ``hook`` (path),
        ``phase``, ``status`` (exit status; -9 when killed at the timeout; None when it could
        not be started), ``seconds``, ``output`` (its last OUTPUT_KEEP bytes), ``error``
        (None, or why it failed). Runs them all even when one fails."""
        env = dict(os.environ)
        env.update(LVMIRROR_PHASE=phase,
                   LVMIRROR_VOLUMES=" ".join(n for n, _ in members),
                   LVMIRROR_IMAGES=" ".join(f"{n}:{i}" for n, i in members),
                   LVMIRROR_GROUP="1" if len(members) > 1 else "0")
        if result is not None:
            env["LVMIRROR_RESULT"] = result
        if split_time is not None:
            env["LVMIRROR_SPLIT_TIME"] = f"{split_time:.6f}"
        return [self._run_one(path, phase, env, timeout) for path in self.programs()]

    @staticmethod
    def _run_one(path, phase, env, timeout) -> dict:
        t0 = time.monotonic()
        rec = dict(hook=path, phase=phase, status=None, seconds=0.0, output="", error=None)
        # output to an unlinked temporary file, not a pipe: the hook is done when it exits,
        # even if it left a process behind that holds its output open (ssh -f, a daemon)
        with tempfile.TemporaryFile() as out_file:
            try:
                proc = subprocess.Popen([path, phase], env=env, stdin=subprocess.DEVNULL,
                                        stdout=out_file, stderr=subprocess.STDOUT,
                                        start_new_session=True, close_fds=True)
            except OSError as exc:
                rec["error"] = f"cannot run: {exc.strerror}"
                log.error("split hook %s (%s): %s", path, phase, rec["error"])
                return rec
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                rec["error"] = f"still running after {timeout:g} s: killed"
            out_file.seek(0)
            out = out_file.read()
        rec["status"] = proc.returncode
        rec["seconds"] = round(time.monotonic() - t0, 6)
        text = out.decode("utf-8", "replace")
        rec["output"] = text[-OUTPUT_KEEP:]
        for line in text.splitlines()[-20:]:
            log.info("split hook %s (%s): %s", os.path.basename(path), phase, line)
        if rec["error"] is None and proc.returncode != 0:
            rec["error"] = f"exit status {proc.returncode}"
        if rec["error"] is not None:
            last = text.strip().splitlines()[-1:] or [""]
            rec["error"] += f": {last[0]}" if last[0] else ""
            log.error("split hook %s (%s) failed: %s", path, phase, rec["error"])
        return rec

    def around(self, members, split, *, timeout: float = DEFAULT_TIMEOUT,
               on_error: str = "abort") -> tuple[dict, list[dict]]:
        """Run the pre-split hooks, ``split()`` (which returns a dict with ``split_time``),
        then the post-split hooks (always, with the outcome in LVMIRROR_RESULT). Returns
        (what ``split`` returned, the hook records). Raises HookError when a pre-split hook
        failed and ``on_error`` is "abort" (nothing is split; the post-split hooks still run,
        to thaw), or whatever ``split`` raised."""
        records = self.run("pre-split", members, timeout=timeout)
        failed = [r for r in records if r["error"] is not None]
        if failed and on_error == "abort":
            why = "; ".join(f"{os.path.basename(r['hook'])}: {r['error']}" for r in failed)
            records += self.run("post-split", members, timeout=timeout,
                                result=f"failed: pre-split hook: {why}")
            raise HookError(f"split not done: pre-split hook {why}")
        try:
            res = split()
        except BaseException as exc:
            self.run("post-split", members, timeout=timeout, result=f"failed: {exc}")
            raise
        records += self.run("post-split", members, timeout=timeout, result="ok",
                            split_time=res.get("split_time"))
        return res, records
