#!/usr/bin/env python3
"""Measurement tools for p2plive, run through scripts/bench-encoders.sh and scripts/soak.sh.

    python3 scripts/perftools.py bench-encoders [--quick] [...]   # CPU per stream-second
    python3 scripts/perftools.py soak [--short] [...]             # memory over time, A/V offset

Everything runs on this machine over 127.0.0.1 with mDNS off. Every wait has a deadline, and
every child process is stopped (SIGINT, then SIGKILL after a bounded wait) when the tool ends,
fails or is interrupted. `--help` on each subcommand lists its options; docs/PERFORMANCE.md
describes what they measure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Bounded waits, in seconds.
LISTEN_TIMEOUT = 30
FIRST_FRAME_TIMEOUT = 30
STOP_TIMEOUT = 8
SETPRIV = shutil.which("setpriv")


class Fail(Exception):
    """A run cannot go on; the message says why."""


# ---------------------------------------------------------------------------------------------
# Child processes


@dataclass
class Child:
    """A child process whose stdout+stderr go to a log file, line by line, through a thread
    that also keeps what `parse` extracts from each line (with the time it was read)."""

    name: str
    proc: subprocess.Popen
    log: Path
    lines: list = field(default_factory=list)  # (monotonic time, line) of interesting lines
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def matching(self, prefix: str) -> list:
        """(time, line) of every kept line containing `prefix`."""
        with self.lock:
            return [(t, line) for t, line in self.lines if prefix in line]

    def last(self, prefix: str):
        found = self.matching(prefix)
        return found[-1] if found else None

    def tail(self, n: int = 30) -> str:
        try:
            return "".join(self.log.read_text(errors="replace").splitlines(True)[-n:])
        except OSError:
            return ""


class Children:
    """Every process this tool started; `stop_all` ends them, also on errors and signals."""

    def __init__(self, keep: tuple[str, ...]):
        self.children: list[Child] = []
        self.keep = keep  # substrings of the lines worth keeping in memory

    def spawn(self, name: str, argv: list[str], log: Path, env: dict | None = None) -> Child:
        log.parent.mkdir(parents=True, exist_ok=True)
        if SETPRIV:
            # setpriv execs the program (same pid), which the kernel then sends SIGTERM if
            # this tool dies without its cleanup (SIGKILL).
            argv = [SETPRIV, "--pdeathsig", "TERM", *argv]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            errors="replace",
            bufsize=1,
        )
        child = Child(name, proc, log)
        self.children.append(child)
        threading.Thread(target=self._pump, args=(child,), daemon=True).start()
        return child

    def _pump(self, child: Child) -> None:
        with open(child.log, "w") as out:
            out.write("# " + " ".join(child.proc.args) + "\n")
            for line in child.proc.stdout:
                out.write(line)
                out.flush()
                if any(k in line for k in self.keep):
                    with child.lock:
                        child.lines.append((time.monotonic(), line.rstrip("\n")))

    def stop(self, children: list[Child], timeout: float = STOP_TIMEOUT) -> None:
        """SIGINT (a clean stop: gst-launch sets NULL, the examples print their summary), a
        bounded wait, then SIGKILL."""
        for c in children:
            if c.alive():
                try:
                    c.proc.send_signal(signal.SIGINT)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for c in children:
            try:
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"  {c.name} (pid {c.pid}) did not stop in {timeout:.0f}s, killing it",
                      file=sys.stderr)
                c.proc.kill()
                c.proc.wait(timeout=5)
        # Let the log pumps drain the last lines.
        time.sleep(0.2)

    def stop_all(self) -> None:
        self.stop([c for c in self.children if c.alive()])


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP end the tool like Ctrl-C does, so `finally` blocks stop the
    children."""

    def handler(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def wait_until(predicate, timeout: float, what: str, watch: list[Child] = ()):
    """Polls `predicate` every 0.1 s until it returns something truthy (returned), fails after
    `timeout` s or as soon as a watched process exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for c in watch:
            if not c.alive():
                raise Fail(f"{c.name} exited (code {c.proc.returncode}) while waiting for "
                           f"{what}; its log {c.log}:\n{c.tail()}")
        if time.monotonic() >= deadline:
            tails = "".join(f"\n--- {c.name} ({c.log}):\n{c.tail(15)}" for c in watch)
            raise Fail(f"no {what} within {timeout:.0f}s{tails}")
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in kB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


# ---------------------------------------------------------------------------------------------
# GStreamer structures as gst-launch -m prints them


FIELD_RE = re.compile(r'([A-Za-z][\w-]*)=\((\w+)\)("(?:[^"\\]|\\.)*"|[^,;]*)')


def parse_structure(text: str) -> dict:
    """key=(type)value pairs of a serialized GstStructure (nested structures stay strings)."""
    out = {}
    for key, typ, value in FIELD_RE.findall(text):
        if value.startswith('"'):
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        elif typ in ("int", "uint", "gint", "guint", "gint64", "guint64", "long", "ulong"):
            try:
                value = int(value)
            except ValueError:
                pass
        elif typ in ("double", "float", "gdouble", "gfloat"):
            try:
                value = float(value)
            except ValueError:
                pass
        elif typ in ("boolean", "gboolean"):
            value = value.strip().lower() in ("true", "1", "yes")
        out[key] = value
    return out


def listening_address(child: Child) -> str | None:
    """The first dialable /ip4/127.0.0.1/tcp address (with /p2p/<id>) from a p2plive-listening
    element message printed by `gst-launch-1.0 -m`."""
    found = child.last("p2plive-listening")
    if not found:
        return None
    s = parse_structure(found[1])
    peer_id = s.get("peer-id", "")
    for addr in str(s.get("multiaddrs", "")).split(","):
        addr = addr.strip()
        if not addr.startswith("/ip4/127.0.0.1/"):
            continue
        if "/p2p/" not in addr and peer_id:
            addr = f"{addr}/p2p/{peer_id}"
        return addr
    return None


def stats_series(child: Child) -> list[tuple[float, dict]]:
    """(time read, fields) of every p2plive-stats message the child printed."""
    return [(t, parse_structure(line)) for t, line in child.matching("p2plive-stats")]


def counter_rate(series, key: str, t0: float, t1: float) -> float | None:
    """Increase per second of a counter between the stats messages nearest to t0 and t1."""
    points = [(t, s[key]) for t, s in series if isinstance(s.get(key), int)]
    if len(points) < 2:
        return None
    a = min(points, key=lambda p: abs(p[0] - t0))
    b = min(points, key=lambda p: abs(p[0] - t1))
    if b[0] <= a[0]:
        return None
    return (b[1] - a[1]) / (b[0] - a[0])


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_outputs(out_dir: Path, stem: str, table: str, data: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text(table)
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")


def machine_info() -> dict:
    return {
        "cores": os.cpu_count(),
        "loadavg_before": loadavg(),
        "nice": os.nice(0),
        "uname": " ".join(os.uname()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


# ---------------------------------------------------------------------------------------------
# bench-encoders


RESOLUTIONS = {"360p": (640, 360), "720p": (1280, 720), "1080p": (1920, 1080)}
# Encoded frames per second below which a run did not keep up with the 30 fps source.
KEEPS_UP_FPS = 28.5


def bench_encoders(args) -> int:
    if args.quick:
        args.resolutions = args.resolutions or "360p"
        args.publishers = args.publishers or "1,2"
        args.duration = args.duration or 5
        args.warmup = args.warmup if args.warmup is not None else 2
    args.resolutions = args.resolutions or "360p,720p,1080p"
    args.publishers = args.publishers or "1,2"
    args.duration = args.duration or 20
    args.warmup = args.warmup if args.warmup is not None else 5
    resolutions = [r.strip() for r in args.resolutions.split(",")]
    for r in resolutions:
        if r not in RESOLUTIONS:
            raise Fail(f"unknown resolution {r}: one of {', '.join(RESOLUTIONS)}")
    publisher_counts = [int(n) for n in args.publishers.split(",")]
    settings = [("before", args.before), ("after", args.after)]

    plugin_dir = Path(args.plugin_dir).resolve()
    if not (plugin_dir / "libgstp2plive.so").exists():
        raise Fail(f"{plugin_dir}/libgstp2plive.so is missing (cargo build --release)")
    env = dict(os.environ, GST_PLUGIN_PATH=str(plugin_dir))
    env.pop("GST_DEBUG", None)
    inspect = subprocess.run(["gst-inspect-1.0", "p2plivesink"], env=env, capture_output=True,
                             text=True, timeout=60)
    if inspect.returncode != 0:
        raise Fail(f"gst-inspect-1.0 p2plivesink failed:\n{inspect.stderr}")
    has_property = "encoder-threads" in inspect.stdout
    if not has_property and not args.omit_property:
        raise Fail("p2plivesink has no encoder-threads property in this build; rebuild, or pass "
                   "--omit-property to smoke-test the script (both columns then measure the "
                   "build's fixed setting)")
    if args.omit_property:
        print("bench-encoders: --omit-property: encoder-threads is not set, so 'before' and "
              "'after' both measure this build's default")

    out_dir = Path(args.out).resolve()
    log_dir = out_dir / "logs"
    info = machine_info()
    print(f"bench-encoders: {info['cores']} cores, load average {info['loadavg_before']:.2f}; "
          f"{args.warmup}s warm-up + {args.duration}s window per run; logs in {log_dir}")
    if info["loadavg_before"] > 0.5 * (info["cores"] or 1):
        print("bench-encoders: warning: the machine is busy; figures will be noisy",
              file=sys.stderr)
    if info["nice"] > 0:
        print(f"bench-encoders: warning: running at nice {info['nice']}: next to other work the "
              "encoders get less CPU and may not keep up", file=sys.stderr)

    runs = []
    for res in resolutions:
        for n in publisher_counts:
            for label, threads in settings:
                run = bench_one(args, env, log_dir, res, n, label,
                                None if args.omit_property else threads)
                runs.append(run)
                print(f"  {res} x{n} {label:6} (encoder-threads="
                      f"{'unset' if args.omit_property else threads}): "
                      f"{fmt(run['cpu_per_stream_s'])} CPU s / stream-s per publisher, "
                      f"{fmt(run['encoded_fps'], 1)} fps encoded, viewer latency "
                      f"{fmt(run['viewer_latency_ms'], 0)} ms, layer {fmt(run['viewer_layer'])}")

    rows = []
    for res in resolutions:
        for n in publisher_counts:
            by = {r["setting"]: r for r in runs if r["resolution"] == res and r["publishers"] == n}
            before, after = by["before"]["cpu_per_stream_s"], by["after"]["cpu_per_stream_s"]
            rows.append({
                "resolution": f"{RESOLUTIONS[res][0]}x{RESOLUTIONS[res][1]}",
                "publishers": n,
                "before": before,
                "after": after,
                "ratio": after / before if before else None,
                "fps_before": by["before"]["encoded_fps"],
                "fps_after": by["after"]["encoded_fps"],
                "latency_ms_before": by["before"]["viewer_latency_ms"],
                "latency_ms_after": by["after"]["viewer_latency_ms"],
            })

    slow = [r for r in rows if any(fps is not None and fps < KEEPS_UP_FPS
                                   for fps in (r["fps_before"], r["fps_after"]))]

    def cpu_cell(value, fps):
        mark = " †" if fps is not None and fps < KEEPS_UP_FPS else ""
        return fmt(value) + mark

    table = (
        f"CPU seconds per stream-second per publisher process (mean over publishers); before: "
        f"encoder-threads={'unset' if args.omit_property else args.before}, after: "
        f"encoder-threads={'unset' if args.omit_property else args.after}; ratio = after / "
        f"before; {args.duration}s window after {args.warmup}s warm-up.\n\n"
        "| resolution | publishers | before | after | ratio | encoded fps before / after "
        "| viewer latency ms before / after |\n|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        table += (f"| {r['resolution']} | {r['publishers']} | "
                  f"{cpu_cell(r['before'], r['fps_before'])} | "
                  f"{cpu_cell(r['after'], r['fps_after'])} | {fmt(r['ratio'], 2)} | "
                  f"{fmt(r['fps_before'], 1)} / "
                  f"{fmt(r['fps_after'], 1)} | {fmt(r['latency_ms_before'], 0)} / "
                  f"{fmt(r['latency_ms_after'], 0)} |\n")
    if slow:
        table += (f"\n† fewer than {KEEPS_UP_FPS:g} frames/s encoded: the encoders did not keep "
                  "up with the 30 fps source (frames queue up and the viewers' latency grows), so "
                  "this CPU figure is not comparable.\n")
    data = {
        "tool": "bench-encoders",
        "machine": info,
        "plugin": str(plugin_dir / "libgstp2plive.so"),
        "encoder_threads_property": has_property and not args.omit_property,
        "before": None if args.omit_property else args.before,
        "after": None if args.omit_property else args.after,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "viewer_decodes": args.decode,
        "rows": rows,
        "runs": runs,
    }
    write_outputs(out_dir, "bench-encoders", table, data)
    print()
    print(table)
    print(f"bench-encoders: wrote {out_dir}/bench-encoders.md and .json")
    return 0


def bench_one(args, env, log_dir: Path, res: str, n: int, label: str, threads) -> dict:
    """n publishers (each with one viewer) at once; CPU of each publisher over the window."""
    width, height = RESOLUTIONS[res]
    tag = f"{res}-x{n}-{label}"
    children = Children(keep=("p2plive-listening", "p2plive-stats", "ERROR", "WARNING"))
    try:
        publishers, viewers = [], []
        for k in range(n):
            topic = f"bench{k}-{os.getpid()}-{tag}"
            sink = (f"p2plivesink topic={topic} mdns=false kademlia=false "
                    f"listen=/ip4/127.0.0.1/tcp/0")
            if threads is not None:
                sink += f" encoder-threads={threads}"
            if args.video_bitrate:
                sink += f" video-bitrate={args.video_bitrate}"
            argv = ["gst-launch-1.0", "-m", "videotestsrc", "is-live=true", "pattern=ball", "!",
                    f"video/x-raw,width={width},height={height},framerate=30/1", "!",
                    *sink.split()]
            publishers.append((topic, children.spawn(f"publisher{k}", argv,
                                                     log_dir / f"{tag}-publisher{k}.log", env)))
        for k, (topic, pub) in enumerate(publishers):
            addr = wait_until(lambda: listening_address(pub), LISTEN_TIMEOUT,
                              f"listening address from {pub.name}", [pub])
            src = (f"p2plivesrc topic={topic} bootstrap={addr} mdns=false kademlia=false "
                   f"listen=/ip4/127.0.0.1/tcp/0")
            if not args.decode:
                src += " decode=false"
            argv = ["gst-launch-1.0", "-m", *src.split(), "!", "fakesink", "sync=true"]
            viewers.append(children.spawn(f"viewer{k}", argv, log_dir / f"{tag}-viewer{k}.log",
                                          env))
        for v in viewers:
            wait_until(lambda: any(s.get("frames-output", 0) > 0 for _, s in stats_series(v)),
                       FIRST_FRAME_TIMEOUT, f"frame at {v.name}", [v] + [p for _, p in publishers])
        time.sleep(args.warmup)
        everyone = [p for _, p in publishers] + viewers
        for c in everyone:
            if not c.alive():
                raise Fail(f"{c.name} exited during warm-up; its log {c.log}:\n{c.tail()}")
        t0 = time.monotonic()
        cpu0 = {c.name: cpu_seconds(c.pid) for c in everyone}
        time.sleep(args.duration)
        cpu1 = {c.name: cpu_seconds(c.pid) for c in everyone}
        t1 = time.monotonic()
        for c in everyone:
            if not c.alive():
                raise Fail(f"{c.name} exited during the window; its log {c.log}:\n{c.tail()}")
        window = t1 - t0
        time.sleep(1.1)  # one more stats message after the window, for the rates

        per_publisher = []
        for (_, p), v in zip(publishers, viewers):
            pstats, vstats = stats_series(p), stats_series(v)
            last_v = vstats[-1][1] if vstats else {}
            per_publisher.append({
                "cpu_per_stream_s": (cpu1[p.name] - cpu0[p.name]) / window,
                "encoded_fps": counter_rate(pstats, "frames", t0, t1),
                "viewer_cpu_per_stream_s": (cpu1[v.name] - cpu0[v.name]) / window,
                "viewer_output_fps": counter_rate(vstats, "frames-output", t0, t1),
                "viewer_latency_ms": last_v.get("latency-ms"),
                "viewer_layer": last_v.get("layer"),
                "viewer_frames_lost": last_v.get("frames-lost"),
            })

        def mean(key):
            values = [x[key] for x in per_publisher if isinstance(x[key], (int, float))]
            return sum(values) / len(values) if values else None

        return {
            "resolution": res,
            "publishers": n,
            "setting": label,
            "encoder_threads": threads,
            "window_s": window,
            "loadavg": loadavg(),
            "cpu_per_stream_s": mean("cpu_per_stream_s"),
            "encoded_fps": mean("encoded_fps"),
            "viewer_cpu_per_stream_s": mean("viewer_cpu_per_stream_s"),
            "viewer_latency_ms": mean("viewer_latency_ms"),
            "viewer_layer": per_publisher[0]["viewer_layer"],
            "per_publisher": per_publisher,
        }
    finally:
        children.stop_all()


# ---------------------------------------------------------------------------------------------
# soak


def least_squares_slope(points: list[tuple[float, float]]) -> float | None:
    """Slope of y over x by least squares; None with fewer than 2 distinct x."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


SUMMARY_RE = re.compile(r"(\w+)=(\S+)")
CSV_COLUMNS = ("t_s", "process", "pid", "rss_kb", "hwm_kb", "cpu_s", "video_frames",
               "audio_buffers", "av_offset_ms")


def soak(args) -> int:
    if args.short:
        args.duration = args.duration or 60
        args.warmup = args.warmup if args.warmup is not None else 20
        args.interval = args.interval or 5
    args.duration = args.duration or 600
    args.warmup = args.warmup if args.warmup is not None else 60
    args.interval = args.interval or 10
    if args.warmup >= args.duration:
        raise Fail("--warmup must be shorter than --duration")

    bin_dir = Path(args.bin_dir).resolve()
    for program in ("publisher", "viewer"):
        if not (bin_dir / program).exists():
            raise Fail(f"{bin_dir}/{program} is missing (cargo build --release --examples)")
    out_dir = Path(args.out).resolve()
    log_dir = out_dir / "logs"
    info = machine_info()
    topic = f"soak-{os.getpid()}"
    # Each example also stops by itself a while after the soak should have ended, in case this
    # tool is killed without running its cleanup.
    safety = str(args.duration + 120)
    listen = "/ip4/127.0.0.1/udp/0/quic-v1,/ip4/127.0.0.1/tcp/0"
    env = dict(os.environ)
    env.pop("GST_DEBUG", None)
    print(f"soak: {info['cores']} cores, load average {info['loadavg_before']:.2f}; publisher "
          f"(640x360 30 fps VP8 + Opus) and {args.viewers} viewers for {args.duration}s, "
          f"memory every {args.interval}s, warm-up {args.warmup}s; output in {out_dir}")

    children = Children(keep=("LISTENING", "PROGRESS", "SUMMARY", "STATS", "error", "warning"))
    samples = []  # dicts, one per process per sample
    try:
        publisher = children.spawn(
            "publisher",
            [str(bin_dir / "publisher"), "--topic", topic, "--listen", listen, "--audio",
             "--duration", safety],
            log_dir / "publisher.log", env)

        def address(child):
            found = child.last("LISTENING ")
            return found[1].split("LISTENING ", 1)[1].strip() if found else None

        previous = wait_until(lambda: address(publisher), LISTEN_TIMEOUT,
                              "LISTENING line from the publisher", [publisher])
        viewers = []
        for k in range(1, args.viewers + 1):
            # viewer1 joins through the publisher, every further viewer through the previous
            # viewer (a relay chain; the mesh then connects them further).
            v = children.spawn(
                f"viewer{k}",
                [str(bin_dir / "viewer"), "--topic", topic, "--listen", listen, "--name",
                 f"viewer{k}", "--bootstrap", previous, "--duration", safety],
                log_dir / f"viewer{k}.log", env)
            viewers.append(v)
            previous = wait_until(lambda: address(v), LISTEN_TIMEOUT,
                                  f"LISTENING line from viewer{k}", [v, publisher])
        everyone = [publisher] + viewers

        csv_path = out_dir / "memory.csv"
        out_dir.mkdir(parents=True, exist_ok=True)
        csv = open(csv_path, "w")
        csv.write(",".join(CSV_COLUMNS) + "\n")
        start = time.monotonic()
        # A sample every interval from t=0, and a last one at the end.
        targets = list(range(0, args.duration, args.interval)) + [args.duration]
        for target in targets:
            time.sleep(max(0.0, start + target - time.monotonic()))
            t = time.monotonic() - start
            line = []
            for c in everyone:
                if not c.alive():
                    raise Fail(f"{c.name} exited at t={t:.0f}s (code {c.proc.returncode}); "
                               f"its log {c.log}:\n{c.tail()}")
                rss, hwm = memory_kb(c.pid)
                row = {"t_s": round(t, 1), "process": c.name, "pid": c.pid, "rss_kb": rss,
                       "hwm_kb": hwm, "cpu_s": round(cpu_seconds(c.pid), 2),
                       "video_frames": "", "audio_buffers": "", "av_offset_ms": ""}
                progress = c.last("PROGRESS ")
                if progress:
                    fields = dict(SUMMARY_RE.findall(progress[1]))
                    for key in ("video_frames", "audio_buffers", "av_offset_ms"):
                        row[key] = fields.get(key, "")
                samples.append(row)
                csv.write(",".join(str(row[k]) for k in CSV_COLUMNS) + "\n")
                extra = (f" frames={row['video_frames']} av={row['av_offset_ms']}ms"
                         if progress else "")
                line.append(f"{c.name} {rss / 1024:.1f}MB{extra}")
            csv.flush()
            print(f"  t={t:4.0f}s  " + " | ".join(line), flush=True)
        csv.close()

        # Viewers first, while the stream still runs, so their summaries describe it; then the
        # publisher (its EOS would otherwise end the viewers).
        children.stop(viewers)
        children.stop([publisher])
    finally:
        children.stop_all()

    return soak_report(args, out_dir, info, everyone, viewers, samples, csv_path)


def soak_report(args, out_dir, info, everyone, viewers, samples, csv_path) -> int:
    run_s = max(s["t_s"] for s in samples)
    short_window = run_s - args.warmup < 300
    procs = []
    for c in everyone:
        mine = [s for s in samples if s["process"] == c.name]
        after = [s for s in mine if s["t_s"] >= args.warmup]
        slope_kb_s = least_squares_slope([(s["t_s"], s["rss_kb"]) for s in after])
        slope = slope_kb_s * 3600 / 1024 if slope_kb_s is not None else None
        procs.append({
            "process": c.name,
            "rss_warm_mb": after[0]["rss_kb"] / 1024 if after else None,
            "warm_t_s": after[0]["t_s"] if after else None,
            "rss_end_mb": mine[-1]["rss_kb"] / 1024,
            "hwm_end_mb": mine[-1]["hwm_kb"] / 1024,
            "slope_mb_per_h": slope,
            "growth_mb": (mine[-1]["rss_kb"] - after[0]["rss_kb"]) / 1024 if after else None,
            "verdict": None if slope is None else
            ("GROWING" if slope > args.max_slope
             and (mine[-1]["rss_kb"] - after[0]["rss_kb"]) / 1024 > args.min_growth
             else "FLAT"),
            "cpu_per_s": (mine[-1]["cpu_s"] - mine[0]["cpu_s"]) / (run_s or 1),
            "warnings": len(c.matching("warning")),
            "errors": len(c.matching("error")),
        })

    viewer_rows = []
    for v in viewers:
        summary = v.last("SUMMARY ")
        stats = v.last("STATS ")
        fields = dict(SUMMARY_RE.findall(summary[1])) if summary else {}
        st = parse_structure(stats[1]) if stats else {}
        viewer_rows.append({
            "process": v.name,
            "video_frames": fields.get("video_frames"),
            "audio_buffers": fields.get("audio_buffers"),
            "size": fields.get("size"),
            "av_offset_ms": fields.get("av_offset_ms"),
            "av_offset_min_ms": fields.get("av_offset_min_ms"),
            "av_offset_max_ms": fields.get("av_offset_max_ms"),
            "av_offset_samples": fields.get("av_offset_samples"),
            "latency_ms": st.get("latency-ms"),
            "layer": st.get("layer"),
            "frames_lost": st.get("frames-lost"),
            "frames_late": st.get("frames-late"),
            "rebases": st.get("rebases"),
            "summary": summary[1] if summary else None,
        })

    table = (f"Soak: publisher (640x360 30 fps VP8 at the sink's default bitrate + Opus) and "
             f"{len(viewers)} viewers, {run_s:.0f}s; memory sampled every {args.interval}s; "
             f"slope by least squares over the samples from t >= {args.warmup}s; GROWING when "
             f"above {args.max_slope:g} MB/h with more than {args.min_growth:g} MB of growth "
             f"from the warm-up sample to the end, else FLAT.\n\n"
             "| process | RSS after warm-up (MB) | RSS at end (MB) | peak RSS (MB) | slope (MB/h) "
             "| verdict | CPU (cores) | warnings / errors logged |\n"
             "|---|---|---|---|---|---|---|---|\n")
    for p in procs:
        table += (f"| {p['process']} | {fmt(p['rss_warm_mb'], 1)} (t={fmt(p['warm_t_s'], 0)}s) | "
                  f"{fmt(p['rss_end_mb'], 1)} | {fmt(p['hwm_end_mb'], 1)} | "
                  f"{fmt(p['slope_mb_per_h'], 1)} | {p['verdict'] or '–'} | "
                  f"{fmt(p['cpu_per_s'], 2)} | {p['warnings']} / {p['errors']} |\n")
    table += ("\n| viewer | video frames | audio buffers | size | A/V offset at end (ms) | "
              "min / max (ms) | latency-ms | layer | frames lost / late | rebases |\n"
              "|---|---|---|---|---|---|---|---|---|---|\n")
    for v in viewer_rows:
        table += (f"| {v['process']} | {fmt(v['video_frames'])} | {fmt(v['audio_buffers'])} | "
                  f"{fmt(v['size'])} | {fmt(v['av_offset_ms'])} | {fmt(v['av_offset_min_ms'])} / "
                  f"{fmt(v['av_offset_max_ms'])} | {fmt(v['latency_ms'], 0)} | "
                  f"{fmt(v['layer'])} | {fmt(v['frames_lost'])} / {fmt(v['frames_late'])} | "
                  f"{fmt(v['rebases'])} |\n")
    if short_window:
        table += (f"\nThe window after warm-up is {run_s - args.warmup:.0f}s: too short for the "
                  "memory verdict to mean much (the soak runs 600 s).\n")
    data = {"tool": "soak", "machine": info, "duration_s": args.duration,
            "warmup_s": args.warmup, "interval_s": args.interval,
            "max_slope_mb_per_h": args.max_slope, "min_growth_mb": args.min_growth,
            "processes": procs, "viewers": viewer_rows,
            "csv": str(csv_path)}
    write_outputs(out_dir, "soak", table, data)
    print()
    print(table)
    print(f"soak: wrote {csv_path}, {out_dir}/soak.md and .json")
    ok = all(v["summary"] and v["video_frames"] not in (None, "0") for v in viewer_rows)
    if not ok:
        print("soak: a viewer printed no summary or received no video", file=sys.stderr)
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------


def main() -> int:
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="tool", required=True)

    b = sub.add_parser("bench-encoders", help="CPU s per stream-second of p2plivesink publishers")
    b.add_argument("--quick", action="store_true",
                   help="smoke run: 360p only, 1 and 2 publishers, 2s warm-up, 5s window")
    b.add_argument("--duration", type=int, help="measurement window per run, s (default 20)")
    b.add_argument("--warmup", type=int, help="s between the first frame and the window "
                   "(default 5)")
    b.add_argument("--resolutions", help="comma-separated of 360p,720p,1080p (default all)")
    b.add_argument("--publishers", help="comma-separated publisher counts (default 1,2)")
    b.add_argument("--before", type=int, default=2, help="encoder-threads of 'before' (2)")
    b.add_argument("--after", type=int, default=0, help="encoder-threads of 'after' (0: auto)")
    b.add_argument("--omit-property", action="store_true",
                   help="do not set encoder-threads (for builds without it: both columns then "
                   "measure the build's fixed setting)")
    b.add_argument("--video-bitrate", type=int,
                   help="p2plivesink video-bitrate, kbit/s (default: the sink's default)")
    b.add_argument("--decode", action="store_true",
                   help="viewers decode the video (default decode=false, so viewers cost "
                   "little CPU next to the publishers being measured)")
    b.add_argument("--plugin-dir", default=str(target / "release"),
                   help="directory of libgstp2plive.so (default target/release)")
    b.add_argument("--out", default=str(target / "bench-encoders"),
                   help="output directory (default target/bench-encoders)")

    s = sub.add_parser("soak", help="publisher + viewers: memory over time, A/V offset")
    s.add_argument("--short", action="store_true",
                   help="test run: 60s, 20s warm-up, a sample every 5s")
    s.add_argument("--duration", type=int, help="s (default 600)")
    s.add_argument("--warmup", type=int, help="s before the memory slope starts (default 60)")
    s.add_argument("--interval", type=int, help="s between memory samples (default 10)")
    s.add_argument("--viewers", type=int, default=3, help="number of viewers (default 3)")
    s.add_argument("--max-slope", type=float, default=10.0,
                   help="MB/h of RSS growth after warm-up above which a process is GROWING "
                   "(default 10)")
    s.add_argument("--min-growth", type=float, default=1.0,
                   help="MB of RSS growth from the warm-up sample to the end below which a "
                   "process is FLAT whatever its slope (one allocator step; default 1)")
    s.add_argument("--bin-dir", default=str(target / "release" / "examples"),
                   help="directory of the publisher and viewer examples")
    s.add_argument("--out", default=str(target / "soak"),
                   help="output directory (default target/soak)")

    args = parser.parse_args()
    install_signal_handlers()
    try:
        if args.tool == "bench-encoders":
            return bench_encoders(args)
        return soak(args)
    except Fail as err:
        print(f"{args.tool}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{args.tool}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
