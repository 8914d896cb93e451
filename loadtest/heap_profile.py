#!/usr/bin/env python3
"""Heap profile of held slow streams: where a proxy's memory per stream goes.

    cargo build --release --features bench --bin llm-gateway --example passthrough   # glibc malloc
    apt-get install -y heaptrack
    python3 loadtest/heap_profile.py [--streams 2000] [--out loadtest/results/heap]

The build must be *without* `--features jemalloc`: heaptrack records allocations by
LD_PRELOAD of the malloc family, which a compiled-in jemalloc bypasses.

For each of passthrough and gateway (the bench's `policy_config`), twice: once idle
(0 streams) and once holding N slow streams (the bench's client: first token at once,
the next 100 s later; every first token awaited), the proxy runs under `heaptrack`;
its RSS is sampled idle and while holding; then the streams are closed and the proxy
stopped with SIGTERM so heaptrack writes its data. Per target it writes the
heaptrack files, `peaks-N.txt` (heaptrack_print --print-peaks of the N-stream run),
`diff.txt` (the same, relative to the idle run: what the streams added, per
allocation site), `sites-N.txt` (every full backtrace's peak, one line each, in KiB
per stream) and `flame-N.txt` (peak bytes by stack, flamegraph.pl input), and prints
peak heap and RSS per stream, the largest sites and the sums per holder (CATEGORIES).
`--prompt-bytes` sends longer prompts than the bench's ~100 bytes.
"""
import argparse, asyncio, os, re, signal, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
from benchlib import Stack, policy_config, proc_rss_bytes, raise_nofile, wait_http_ok  # noqa: E402


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def traced_child(wrapper_pid, binary, deadline_s=30):
    """The profiled process: the heaptrack script's child running `binary`."""
    want = os.path.realpath(binary)
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        try:
            with open(f"/proc/{wrapper_pid}/task/{wrapper_pid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        for k in kids:
            try:
                if os.path.realpath(f"/proc/{k}/exe") == want:
                    return k
            except OSError:
                pass
        time.sleep(0.05)
    sys.exit(f"no {binary} under heaptrack pid {wrapper_pid}")


def hold(port, pid, n, body):
    """RSS of `pid` idle, then while `n` streams are held; closes them."""
    idle = proc_rss_bytes(pid)
    if n == 0:
        return idle, idle, 0, 0

    async def run():
        pairs, failed = await bench.hold_streams(port, n, body=body)
        time.sleep(1)  # let every task settle before sampling
        rss = proc_rss_bytes(pid)
        for _, w in pairs:
            w.close()
        return rss, len(pairs), failed
    rss, held, failed = asyncio.run(run())
    time.sleep(1)
    return idle, rss, held, failed


def stop(wrapper, child):
    os.kill(child, signal.SIGTERM)
    try:
        wrapper.wait(120)  # heaptrack_interpret finishes the file after the child exits
    except subprocess.TimeoutExpired:
        wrapper.kill()
        wrapper.wait()


def run_passthrough(a, n, data):
    mock = subprocess.Popen([a.gateway_bin, "mock-provider", "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        mock_port = int(mock.stdout.readline().strip().rsplit(":", 1)[1])
        wrapper = subprocess.Popen(["heaptrack", "-o", data, a.passthrough_bin, "127.0.0.1:0",
                                    f"127.0.0.1:{mock_port}"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        port = None
        for line in wrapper.stdout:
            if line.startswith("listening on "):
                port = int(line.strip().rsplit(":", 1)[1])
                break
        child = traced_child(wrapper.pid, a.passthrough_bin)
        if port is None or not wait_http_ok(port, "/v1/models"):
            stop(wrapper, child)
            sys.exit("passthrough did not start under heaptrack")
        r = hold(port, child, n, a.body)
        stop(wrapper, child)
        return r
    finally:
        mock.terminate()
        mock.wait()


def run_gateway(a, n, data):
    with Stack(a.gateway_bin, [], policy_config, gw_wrap=["heaptrack", "-o", data]) as st:
        child = traced_child(st.gw.pid, a.gateway_bin)
        r = hold(st.port, child, n, a.body)
        stop(st.gw, child)
        return r


def heaptrack_file(data):
    for ext in (".zst", ".gz"):
        if os.path.exists(data + ext):
            return data + ext
    sys.exit(f"heaptrack wrote no {data}.zst/.gz")


def peak_heap(text):
    """heaptrack_print's 'peak heap memory consumption: 12.34M' in bytes."""
    m = re.search(r"peak heap memory consumption:\s*([\d.]+)([KMGT]?)", text)
    if not m:
        return None
    return float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2)]


SIZE = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
# Frames that say nothing about who holds the memory: the allocator's and std's own.
BORING = re.compile(r"/rustc/|/bytes-\d|/hashbrown-\d|/slab-\d|/indexmap-\d|/smallvec-\d")


# Who holds a stream's heap. The big buffers by their allocation site; the rest by the
# innermost frame that is gateway, Pingora or tokio code (not std, bytes, http, serde),
# and Pingora's allocations made for a subrequest apart from the others.
GATEWAY = re.compile(r" (src/(proxy|providers|limits|routing|cache|auth|audit|metrics|accounting|breaker|error)/?"
                     r"|examples/passthrough\.rs)")
# pingora-http (header maps) is a library its callers use, like http or bytes.
PINGORA = re.compile(r"pingora-(core|proxy|cache|pool|runtime)|tokio-| src/(protocols|apps|services|connectors|listeners|subrequest|runtime|sync|io|task)/")
SUBREQUEST = re.compile(r"process_subrequest|create_subrequest|new_from_session|subrequest/")
CATEGORIES = [
    "client read buffer (Pingora, 64 KiB BufReader)",
    "upstream body buffer (Pingora, 64 KiB chunked reader)",
    "allocated by the gateway's (or the example's) own code",
    "subrequest: its session, proxy state, task and channels (Pingora)",
    "connection: task, session, proxy state, headers (Pingora/tokio)",
]


def category(full):
    if "buf_reader.rs" in full:
        return CATEGORIES[0]
    if "prepare_buf" in full:
        return CATEGORIES[1]
    for frame in full.splitlines():
        if SUBREQUEST.search(frame):
            return CATEGORIES[3]
        if GATEWAY.search(frame):
            return CATEGORIES[2]
        if PINGORA.search(frame):
            break
    return CATEGORIES[3] if SUBREQUEST.search(full) else CATEGORIES[4]


def parse_peaks(text, depth=4):
    """(bytes, calls, short site, full backtrace) per peak consumer of heaptrack_print
    --merge-backtraces=0 output; the short site is the first `depth` frames outside
    std/alloc/bytes (file:line, registry paths shortened)."""
    out = []
    for block in re.split(r"\n(?=[\d.]+[KMGT]?B? peak memory consumed)", text):
        m = re.match(r"([\d.]+)([KMGT]?)B? peak memory consumed over (\d+) calls from", block)
        if not m:
            continue
        frames, full = [], []
        lines = block.splitlines()[1:]
        for i, line in enumerate(lines):
            line = line.strip()
            if not line.startswith("at "):
                continue
            loc = re.sub(r".*/index\.crates\.io-[0-9a-f]+/", "", line[3:])
            fn = re.sub(r"_RN\w+", "", lines[i - 1].strip()) if i else "?"
            full.append(f"{fn} {loc}")
            if len(frames) < depth and not BORING.search(line):
                frames.append(f"{fn} {loc}")
        b = float(m.group(1)) * SIZE[m.group(2)]
        out.append((b, int(m.group(3)), " <- ".join(frames), "\n".join(full)))
    return out


def sites(entries, per, top=25):
    """One line per consumer: bytes per stream (`per` = streams held), calls, site."""
    return "\n".join(f"{b / per / 1024:8.2f} KiB/stream {calls:6d} calls  {site}"
                     for b, calls, site, _ in entries[:top])


def categories(entries, per, min_calls):
    """KiB per stream by CATEGORIES, over the consumers allocated at least `min_calls`
    times (i.e. about once per stream or more), and the rest."""
    sums = {name: 0.0 for name in CATEGORIES}
    rest = 0.0
    for b, calls, _, full in entries:
        if calls < min_calls:
            rest += b
        else:
            sums[category(full)] += b
    return {k: v / per / 1024 for k, v in sums.items()}, rest / per / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway-bin", default="target/release/llm-gateway")
    ap.add_argument("--passthrough-bin", default="target/release/examples/passthrough")
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "heap"))
    ap.add_argument("--targets", default="passthrough,gateway")
    ap.add_argument("--prompt-bytes", type=int, default=0,
                    help="prompt size of the streams (default: the bench's short prompt)")
    ap.add_argument("--top", type=int, default=15, help="allocation sites printed per target")
    a = ap.parse_args()
    a.body = bench.stream_body(a.prompt_bytes)
    raise_nofile()
    for name in a.targets.split(","):
        d = os.path.join(a.out, name)
        os.makedirs(d, exist_ok=True)
        files, rss = {}, {}
        for n in (0, a.streams):
            data = os.path.join(d, f"heaptrack-{n}")
            for ext in (".zst", ".gz"):
                if os.path.exists(data + ext):
                    os.remove(data + ext)
            log(f"{name}: {n} streams under heaptrack")
            runner = run_gateway if name == "gateway" else run_passthrough
            idle, loaded, held, failed = runner(a, n, data)
            if n and (failed or held != n):
                log(f"  {held} held, {failed} failed")
            files[n], rss[n] = heaptrack_file(data), (idle, loaded, held)
        n = a.streams
        peaks = subprocess.run(["heaptrack_print", "-f", files[n], "--print-peaks=1", "--print-allocators=0", "--print-temporary=0",
                                "-n", "40", "-s", "3"], capture_output=True, text=True).stdout
        base = subprocess.run(["heaptrack_print", "-f", files[0], "--print-peaks=0", "--print-allocators=0", "--print-temporary=0"],
                              capture_output=True, text=True).stdout
        diff = subprocess.run(["heaptrack_print", "-f", files[n], "-d", files[0], "--print-peaks=1", "--print-allocators=0", "--print-temporary=0",
                               "-n", "40", "-s", "3"], capture_output=True, text=True).stdout
        subprocess.run(["heaptrack_print", "-f", files[n], "--print-peaks=0", "--print-allocators=0", "--print-temporary=0",
                        "--flamegraph-cost-type", "peak", "-F", os.path.join(d, f"flame-{n}.txt")],
                       capture_output=True, text=True)
        unmerged = subprocess.run(["heaptrack_print", "-f", files[n], "--merge-backtraces=0", "--print-peaks=1",
                                   "--print-allocators=0", "--print-temporary=0", "-n", "400"],
                                  capture_output=True, text=True).stdout
        held = max(rss[n][2], 1)
        entries = parse_peaks(unmerged)
        summary = sites(entries, held, top=80)
        cats, rest = categories(entries, held, min_calls=held // 20)
        for fname, text in ((f"peaks-{n}.txt", peaks), ("peaks-0.txt", base), ("diff.txt", diff),
                            (f"sites-{n}.txt", summary)):
            with open(os.path.join(d, fname), "w") as f:
                f.write(text)
        p_n, p_0 = peak_heap(peaks), peak_heap(base)
        idle, loaded, held = rss[n]
        print(f"{name}: {held} streams held")
        print(f"  peak heap: idle run {p_0 / 2**20:.1f} MiB, {n}-stream run {p_n / 2**20:.1f} MiB"
              f" -> {(p_n - p_0) / max(held, 1) / 1024:.1f} KiB per stream")
        print(f"  RSS (under heaptrack): idle {idle / 2**20:.1f} MiB, holding {loaded / 2**20:.1f} MiB"
              f" -> {(loaded - idle) / max(held, 1) / 1024:.1f} KiB per stream")
        print(f"  per-site peaks: {d}/peaks-{n}.txt, streams' share: {d}/diff.txt; largest sites per stream:")
        print("\n".join("    " + line for line in summary.splitlines()[:a.top]))
        print("  by holder (consumers allocated >= streams/20 times; KiB per stream):")
        for k, v in cats.items():
            print(f"    {v:7.1f}  {k}")
        print(f"    {rest:7.1f}  (smaller consumers, not per stream)")
        print(f"    {sum(cats.values()):7.1f}  total of the above")


if __name__ == "__main__":
    main()
