"""Consistency groups: split one image of each of several volumes at one instant, or roll them
back together.

A database that keeps its data on one LUN and its write-ahead log on another needs copies that
belong together: every write acknowledged before T on any of the volumes is in the copies, no
write begun after T on any of them is. Splitting the volumes one after the other does not give
that: a log write acknowledged after the log volume's split (so missing from its copy) can be
followed, before the data volume's split, by a data write that depends on it (so present in the
data copy).

How lvmirror does it: **it holds completions across the group for the instant.**

1. ``prepare`` every member (``SplitControl.prepare``: checks, the image saved as split while
   it still takes every write; slow steps such as metadata saves happen here, before the
   instant).
2. Hold the completions of every LUN of the member volumes (``LunServer.hold``): commands are
   still fetched and run, only their status is kept from the initiator.
3. ``switch`` each member at its own T_i (an epoch swap, microseconds each, plus a call into
   the volume's process).
4. Release the completions (``LunServer.release``), then ``finish`` every member (drain the
   I/O begun before its T_i, make the split durable).

Why this is exact: a write W1 that entered a volume's epoch after that volume's T_i cannot be
acknowledged before step 4, when every member has switched; so a write W2 that depends on W1
(begun after W1's acknowledgement) begins after every T and is in no copy. A write acknowledged
before step 2 completed to every image and is in every copy. Why not a single barrier for all
epochs: with a process per volume the epochs live in different processes; one barrier would
block the start of new I/O on every volume for the same inter-process round trips, and
holding completions never stops I/O from starting (rule 2: I/O after T is never paused).
What the initiators see is acknowledgements delayed by the hold, which ``split_group``
returns in ``hold_seconds`` (and lvmirror prints).

Roll back together (``restore_group``): the restores start under the same hold, so from the
initiators' side every volume reads as its split copy from the same instant.
"""

from __future__ import annotations

import logging
import threading
import time

from lvmirror.mirror.resync import check_rate
from lvmirror.volname import check_volume_name
from lvmirror.errors import ConfigError, LvmirrorError, StateError

log = logging.getLogger("lvmirrord")

__all__ = ["split_group", "restore_group", "parse_members", "HOLD_MAX"]

# One consistency-group split or restore at a time in this lvmirrord: two at once on the same
# volumes would hold the same LUNs (the second refused after the first prepared its members),
# and one's release would end the other's hold (trial 25)
_GROUP_LOCK = threading.Lock()

# seconds a LUN holds completions at most (a safety timer releases them; the kernel fails a
# command left in the ring for cmd_time_out, 30 s)
HOLD_MAX = 10.0


def parse_members(members) -> list[tuple[str, int]]:
    """Check a group's members: a list of (volume name, image index) pairs, or of
    "VOLUME:IMAGE" strings; at least one, each volume at most once, each name a valid volume
    name (``volname.check_volume_name``: "db:2:3" is refused, not read as volume "db:2").
    Returns the pairs. ConfigError otherwise."""
    out = []
    for m in members:
        if isinstance(m, str):
            name, sep, index = m.rpartition(":")
            if not sep or not name or not (index.isascii() and index.isdigit()):
                raise ConfigError(f"group member {m!r}: expected VOLUME:IMAGE (an image index)")
            m = (name, int(index))
        try:
            name, image = m
            name, image = str(name), int(image)
        except (TypeError, ValueError):
            raise ConfigError(f"group member {m!r}: expected (volume, image index)") from None
        check_volume_name(name, f"group member {name}:{image}: ")
        if image < 0:
            raise ConfigError(f"group member {name}:{image}: the image index is negative")
        out.append((name, image))
    if not out:
        raise ConfigError("a consistency group needs at least one VOLUME:IMAGE")
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"a consistency group splits one image per volume; named twice: "
                          f"{', '.join(dup)}")
    return out


def _failed(message: str) -> StateError:
    """A consistency group's failure: said in the journal (error) and returned as the
    StateError to raise, with the same words."""
    log.error("%s", message)
    return StateError(message)


def _hosts(host_of, members):
    """[(host, [volume names])] for the members, hosts in first-member order."""
    order, names = [], {}
    for name, _ in members:
        host = host_of(name)
        key = id(host)
        if key not in names:
            order.append(host)
            names[key] = []
        names[key].append(name)
    return [(h, names[id(h)]) for h in order]


def _hold(groups, hold_max):
    """Hold the completions of every LUN of ``groups``; ``[(host, names, LUNs held)]``."""
    held = []
    try:
        for host, names in groups:
            n = host.hold_completions(names, hold_max)
            held.append((host, names, n))
    except BaseException:
        _release(held)
        raise
    return held


def _release(held) -> dict:
    """End the hold: ``{"luns", "commands", "seconds", "expired"}`` - LUNs released, the
    completions they held, the longest hold (s), and the volumes some of whose LUNs the safety
    timer (``hold_max``) had already released: their initiators heard of completions before
    every member's step was done, so the group's one instant does not hold for them."""
    out = dict(luns=0, commands=0, seconds=0.0, expired=[])
    for host, names, n in held:
        try:
            r = host.release_completions(names)
        except Exception as exc:        # its LUNs' safety timers release them
            log.error("consistency group: releasing completions of %s: %s", ", ".join(names),
                      exc)
            out["expired"] += names
            continue
        out["luns"] += r["luns"]
        out["commands"] += r["commands"]
        out["seconds"] = max(out["seconds"], r["seconds"])
        if r["luns"] < n:
            out["expired"] += names
    return out


def _each_under_hold(groups, hold_max, members, step):
    """Hold the completions of ``groups``, run ``step(name, image)`` for each member in order
    until one raises, release. Returns (``[(name, image, value)]`` of the members done, the
    ``(name, image, exception)`` that stopped it or None, what ``_release`` reports)."""
    done, failed = [], None
    held = _hold(groups, hold_max)
    try:
        for name, image in members:
            try:
                done.append((name, image, step(name, image)))
            except Exception as exc:
                failed = (name, image, exc)
                break
    finally:
        hold = _release(held)
    return done, failed, hold


def split_group(host_of, members, *, hold_max: float = HOLD_MAX) -> dict:
    """Split image ``image`` of each member volume at one instant (see the module docstring).

    ``host_of(name)``: the VolumeHost (or VolumeProcess) serving volume ``name``;
    ``members``: as ``parse_members`` takes them. Returns ``{"members": [split results as
    VolumeHost.split returns them, with "volume"], "split_time": the first T (s since the
    epoch), "switch_span": seconds from the first T to the last, "hold_seconds": the longest
    time a LUN held completions, "held_commands": completions held, "luns": LUNs held}``.

    Raises ConfigError (bad members, a volume not open) or StateError (a member cannot be
    split) with nothing split; StateError naming what was split when a member fails at its
    instant after others were split, or fails to finish (a write begun before T still in
    flight on its image, ``SplitControl.finish``) while the others finish: those are split,
    consistent with each other.
    """
    with _GROUP_LOCK:
        return _split_group(host_of, members, hold_max)


def _split_group(host_of, members, hold_max: float) -> dict:
    """``split_group``'s work, under ``_GROUP_LOCK``."""
    members = parse_members(members)
    groups = _hosts(host_of, members)
    hosts = {name: host_of(name) for name, _ in members}
    prepared = []
    try:
        for name, image in members:
            hosts[name].split_prepare(name, image)
            prepared.append((name, image))
    except BaseException as exc:
        _not_split(hosts, members, prepared, exc)
        raise
    try:
        switched, failed, hold = _each_under_hold(
            groups, hold_max, members,
            lambda name, image: hosts[name].split_switch(name, image))
    except Exception as exc:
        # the hold itself failed (a LUN's completions already held): nothing switched,
        # every prepared member is undone (trial 25: left prepared, each volume refused
        # every split, resync and restore until lvmirrord restarted)
        _not_split(hosts, members, members, exc)
        raise
    if failed is not None:
        for name, image in members:
            if not any(s[0] == name for s in switched):
                _abort(hosts[name], name, image)
    results, unfinished = [], []
    for name, image, _ in switched:
        try:                    # every member past its T is finished, whatever another does
            res = hosts[name].split_finish(name, image)
        except Exception as exc:
            unfinished.append(f"{name}:{image} ({exc})")
            continue
        res["volume"] = name
        results.append(res)
    if hold["expired"]:
        done = ", ".join(f"{r['volume']}:{r['index']}" for r in results) or "none"
        raise _failed(f"consistency group: the completions of {', '.join(hold['expired'])} "
                      f"were released after {hold_max:g} s (the safety limit) before every "
                      f"member was split, so the copies are not consistent with each other; "
                      f"split: {done}; resync those and split the group again")
    if unfinished:
        done = ", ".join(f"{r['volume']}:{r['index']}" for r in results) or "none"
        raise _failed(f"consistency group: not split after their instant: "
                      f"{'; '.join(unfinished)}; split (consistent with each other): "
                      f"{done}; resync those and split the group again")
    if failed is not None:
        name, image, exc = failed
        done = ", ".join(f"{r['volume']}:{r['index']}" for r in results) or "none"
        raise _failed(f"consistency group: {name}:{image} could not be split ({exc}); split "
                      f"(consistent with each other): {done}; resync those and split the "
                      f"group again")
    times = [t for _, _, t in switched]
    out = dict(members=results, split_time=min(times), switch_span=max(times) - min(times),
               hold_seconds=hold["seconds"], held_commands=hold["commands"], luns=hold["luns"])
    log.info("consistency group %s split at %.6f: switches within %.6f s, completions held "
             "%.6f s (%d commands on %d LUNs)",
             " ".join(f"{n}:{i}" for n, i in members), out["split_time"], out["switch_span"],
             out["hold_seconds"], out["held_commands"], out["luns"])
    return out


def _not_split(hosts, members, prepared, exc):
    """A group split that failed before any member switched: said in the journal, and every
    member of ``prepared`` undone (``_abort``)."""
    log.error("consistency group %s: not split: %s",
              " ".join(f"{n}:{i}" for n, i in members), exc)
    for name, image in prepared:
        _abort(hosts[name], name, image)


def _abort(host, name, image):
    try:
        host.split_abort(name, image)
    except Exception as exc:
        log.error("consistency group: undoing the prepared split of %s:%d: %s", name, image, exc)


def _refuse_other_instants(times: dict) -> None:
    """StateError (nothing started) when the members' split images were not split at one
    instant: ``times`` maps (volume, image) to the image's T (seconds since the epoch, None
    when unknown), and a group split switches every member within its hold, at most HOLD_MAX
    seconds, so T further apart than that come from separate splits. Rolled back together
    they would not read as the group at one instant, which ``restore-group`` reports (trial
    25: split-group's members and a later split's were restored together)."""
    known = {m: t for m, t in times.items() if t is not None}
    if len(known) < 2:
        return
    first = min(known, key=known.get)
    last = max(known, key=known.get)
    spread = known[last] - known[first]
    if spread > HOLD_MAX:
        def at(t):
            return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
        raise _failed(f"consistency group: {first[0]}:{first[1]} was split at "
                      f"{at(known[first])} and {last[0]}:{last[1]} at {at(known[last])}, "
                      f"{spread:.1f} s apart: not one group split (its members are split "
                      f"within {HOLD_MAX:g} s), so restored together the volumes would not "
                      f"read as the group at one instant; restore each with 'restore' if that "
                      f"is meant; no restore of the group was started")


def restore_group(host_of, members, rate_mbps: float = 0.0, *,
                  hold_max: float = HOLD_MAX) -> dict:
    """Roll every member volume back to its split image at one instant: the restores start
    while the completions of all their LUNs are held, so each volume reads as its split copy
    from the same moment on (``VolumeHost.restore``; the copies then run in the background at
    ``rate_mbps`` MB/s each, 0: unlimited). Every member is checked first with the refusals
    of its own restore (``VolumeHost.restore_check``: the image split, available and not
    exported or backed up, no other restore unfinished, the volume online), and a StateError
    (ConfigError for no such volume or image) is raised with nothing started when one would
    refuse, or when the split images' T lie more than HOLD_MAX seconds apart (not one group
    split: ``_refuse_other_instants``). A restore can still fail to start after the checks
    (the state changed meanwhile). Returns
    ``{"members": [job progress with "volume"], "hold_seconds", "held_commands", "luns"}``.
    StateError naming the restores already started when one fails to start."""
    rate_mbps = float(check_rate(rate_mbps or None) or 0.0)    # ValueError before anything
    with _GROUP_LOCK:
        return _restore_group(host_of, members, rate_mbps, hold_max)


def _restore_group(host_of, members, rate_mbps: float, hold_max: float) -> dict:
    """``restore_group``'s work, under ``_GROUP_LOCK``."""
    members = parse_members(members)
    hosts = {name: host_of(name) for name, _ in members}
    times = {}
    for name, image in members:
        # the member's own refusals (``JobControl.check_restore``), not a reading of its
        # status: a restore left cancelled or failed from another image, or a split image
        # that cannot be opened, refuses too (trial 23: the status check let such a member
        # through, and the members before it were rolled back without it). ``fresh``: a
        # stopped restore of the same image would be resumed, rolled back at its own earlier
        # instant, not the group's (trial 24). ``flush``: each restore's start makes the live
        # images durable first; done here, before the hold, a failing flush refuses with
        # nothing started, and the flushes under the hold have only the writes since to do
        # (trial 24: a flush failing under the hold left the group half rolled back, and a
        # slow one outlasted the hold)
        try:
            times[(name, image)] = hosts[name].restore_check(name, image, fresh=True,
                                                             flush=True)
        except ConfigError:
            raise
        except LvmirrorError as exc:
            # (StateError, or VolumeIOError: a flush that failed)
            raise _failed(f"{exc}; no restore of the group was started") from None
    _refuse_other_instants(times)
    groups = _hosts(host_of, members)
    t0 = time.monotonic()
    started, failed, hold = _each_under_hold(
        groups, hold_max, members,
        lambda name, image: dict(hosts[name].restore(name, image, rate_mbps), volume=name))
    results = [res for _, _, res in started]
    if failed is not None:
        name, image, exc = failed
        done = ", ".join(f"{r['volume']}" for r in results) or "none"
        raise _failed(f"consistency group: the restore of {name}:{image} did not start "
                      f"({exc}); restores started: {done}")
    if hold["expired"]:
        done = ", ".join(r["volume"] for r in results)
        raise _failed(f"consistency group: the completions of {', '.join(hold['expired'])} "
                      f"were released after {hold_max:g} s (the safety limit) before every "
                      f"member's restore began, so the volumes were not rolled back at one "
                      f"instant; restores started: {done}")
    log.info("consistency group %s: restores started together (%.3f s, completions held "
             "%.6f s)", " ".join(f"{n}:{i}" for n, i in members), time.monotonic() - t0,
             hold["seconds"])
    return dict(members=results, hold_seconds=hold["seconds"], held_commands=hold["commands"],
                luns=hold["luns"])
