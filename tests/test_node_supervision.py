"""How `fedstream server` and `fedstream client` start, supervise and stop their processes.

Real processes throughout: plain Python ones for the helpers in `protocol/runtime.py`, and
Flower's SuperLink and SuperNode (on 127.0.0.1) for the commands; the tests that start
Flower are marked slow.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from waiting import wait_until

from fedstream.client.node import exit_reason
from fedstream.protocol import runtime

CONFIG = """\
[federation]
clients = 1
min_clients = 1
rounds = 2
round_timeout = 60.0
[stream]
n_features = 8
n_classes = 3
budget = 20
[learner]
model = "logreg"
"""


@pytest.fixture
def work():
    # Unix socket paths must stay under 108 bytes: a short directory, not pytest's tmp_path.
    path = Path(tempfile.mkdtemp(prefix="fsn", dir="/tmp"))
    (path / "cfg.toml").write_text(CONFIG)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def fedstream(*args: str, cwd: Path, log: Path) -> subprocess.Popen:
    """A fedstream command in a session of its own, as a terminal would run it: SIGINT is
    at its default (a shell's background job would ignore it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "fedstream.cli.main", *args], cwd=cwd,
        stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def run(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedstream.cli.main", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def kill_session(proc: subprocess.Popen) -> None:
    """Stop a command as a user would (SIGTERM: a server stops what its SuperLink started,
    outside its session), then SIGKILL what is left of its session."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def certs(work: Path, *nodes: str) -> None:
    made = run("certs", "creds", *(a for n in nodes for a in ("--node", n)), cwd=work)
    assert made.returncode == 0, made.stderr


# -- runtime helpers, with plain processes ---------------------------------------------------

TREE = textwrap.dedent("""\
    import subprocess, sys, time
    # a child in the same group, and one that moves to a session of its own and starts
    # a grandchild there (as the SuperLink's SuperExec and its flwr-serverapp do)
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    subprocess.Popen(sleeper)
    subprocess.Popen([sys.executable, "-c",
        "import subprocess, sys, time; subprocess.Popen(%r); time.sleep(600)" % (sleeper,)],
        start_new_session=True)
    time.sleep(600)
""")


def alive(p: psutil.Process) -> bool:
    """Running and not a zombie; a process that ends while it is asked is not alive."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def command(p: psutil.Process) -> str:
    """Name and command line, or "" for a process that ended (or became a zombie) between
    being listed and being read: short-lived helpers come and go while a server starts."""
    try:
        return " ".join([p.name(), *p.cmdline()])
    except psutil.Error:
        return ""


def test_stop_tree_stops_descendants_in_other_sessions(tmp_path: Path) -> None:
    proc = runtime.spawn([sys.executable, "-c", TREE], None, tmp_path / "log", tmp_path)
    wait_until(lambda: len(runtime.descendants(proc.pid)) == 3, "the tree", 30)
    tree = runtime.descendants(proc.pid)
    assert len({p.pid for p in tree} | {proc.pid}) == 4
    assert any(os.getsid(p.pid) != os.getsid(proc.pid) for p in tree)
    runtime.stop_tree(proc, grace=5.0)
    assert proc.poll() is not None
    wait_until(lambda: not any(alive(p) for p in tree), "the tree to go", 10)


UNREAPED = textwrap.dedent("""\
    import signal, subprocess, sys, time
    # As a SuperLink: it never reaps its app, and it stops only once the app has gone
    # (had it been asked first, it would wait for the app's connection, then be killed).
    app = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    def stop(*_):
        while open(f"/proc/{app.pid}/stat").read().split()[2] != "Z":
            time.sleep(0.05)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    time.sleep(600)
""")


def test_stop_tree_stops_the_apps_first_and_does_not_wait_on_their_zombies(
    tmp_path: Path,
) -> None:
    proc = runtime.spawn([sys.executable, "-c", UNREAPED], None, tmp_path / "log", tmp_path)
    wait_until(lambda: len(runtime.descendants(proc.pid)) == 1, "the app", 30)
    started = time.monotonic()
    runtime.stop_tree(proc, grace=60.0)
    # Stopped by SIGTERM in turn (exit 0), not by SIGKILL once a grace period ran out.
    assert proc.returncode == 0 and time.monotonic() - started < 30


def test_port_in_use_sees_a_listener_not_a_closed_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.listen()
        assert runtime.port_in_use("127.0.0.1", port)
        assert runtime.listens_on(os.getpid(), port)
    assert not runtime.port_in_use("127.0.0.1", port)
    assert not runtime.listens_on(os.getpid(), port)


SIGNALLED = textwrap.dedent("""\
    import os, signal, sys, time
    from fedstream.protocol.runtime import Stopped, on_signals
    try:
        with on_signals():
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))
            time.sleep(10)
    except Stopped as e:
        print(e)
        sys.exit(e.exit_code)
""")


@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_stops_with_the_shells_exit_code(sig: str, code: int) -> None:
    done = subprocess.run([sys.executable, "-c", SIGNALLED, sig], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == code and done.stdout.strip() == sig


# -- what a SuperNode's log means ------------------------------------------------------------

# Verbatim (ANSI colours and all) from flwr 1.42 SuperNodes refused by a SuperLink.
REFUSED = {
    "not registered": (
        "\x1b[91mERROR \x1b[0m:     Exit Code: 305\nFailed to initialize the connection to "
        "the SuperLink.\n[code: 2004] Failed to activate SuperNode.\nThe SuperNode could not "
        "establish a connection to the SuperLink.\n\nFor more information, visit: "
        "<https://flower.ai/docs/framework/1.42/en/ref-exit-codes/305.html>\n",
        ["not registered", "[code: 2004] Failed to activate SuperNode."],
    ),
    "wrong CA": (
        "\x1b[91mERROR \x1b[0m:     SSL/TLS handshake error detected.\n\x1b[91mERROR \x1b[0m:"
        "     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n[SSL: "
        "CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer "
        "certificate (_ssl.c:1006)\n\n",
        ["not signed by the CA", "CERTIFICATE_VERIFY_FAILED"],
    ),
    # Python's ssl words these so; each also says CERTIFICATE_VERIFY_FAILED, which alone
    # would blame the CA.
    "certificate for another host": (
        "\x1b[91mERROR \x1b[0m:     Exit Code: 305\nFailed to initialize the connection to "
        "the SuperLink.\n[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: Hostname "
        "mismatch, certificate is not valid for 'localhost'. (_ssl.c:1006)\n\n",
        ["not for the address this device dials", "Hostname mismatch"],
    ),
    "expired certificate": (
        "\x1b[91mERROR \x1b[0m:     Exit Code: 305\nFailed to initialize the connection to "
        "the SuperLink.\n[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
        "certificate has expired (_ssl.c:1006)\n\n",
        ["certificate has expired (or this machine's clock is wrong)"],
    ),
    "plaintext against TLS, under load": (
        "\x1b[91mERROR \x1b[0m:     Connection attempt failed, retrying in 1.93 seconds\n"
        "httpcore.ReadError: [Errno 104] Connection reset by peer\n",
        ["--insecure against a TLS server?", "Connection reset by peer"],
    ),
    "no --key for a server that authenticates": (
        "\x1b[91mERROR \x1b[0m:     Exit Code: 305\nFailed to initialize the connection to "
        "the SuperLink.\n[code: 2001] SuperNode authentication is enabled. All SuperNodes "
        "must be registered via the CLI.\n\n",
        ["this one has no key: pass --key", "[code: 2001]"],
    ),
    "replaced server": (
        "\x1b[92mINFO \x1b[0m:      SuperNode terminated gracefully.\nTraceback (most recent "
        "call last):\n  File \"x.py\", line 1, in f\nhttpx.HTTPStatusError: Client error '401 "
        "Unauthorized' for url 'https://127.0.0.1:9092/v1/fleet/send-node-heartbeat'\n",
        ["401 Unauthorized", "httpx.HTTPStatusError"],
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_exit_reason_names_the_refusal(case: str) -> None:
    text, expected = REFUSED[case]
    why = exit_reason(text, 1)
    assert all(e in why for e in expected), why
    assert "Exit Code" not in why and "For more information" not in why


def test_without_ca_an_unknown_issuer_is_not_blamed_on_ca() -> None:
    text = REFUSED["wrong CA"][0]
    why = exit_reason(text, 1, ca_given=False)
    assert "no --ca was given: pass --ca" in why and "given with --ca" not in why


def test_a_supernode_that_ended_itself_quietly_is_explained() -> None:
    quiet = "\x1b[92mINFO \x1b[0m:      SuperNode terminated gracefully.\n"
    assert "401 Unauthorized" in exit_reason(quiet, 0)
    assert "401 Unauthorized" in exit_reason(quiet, -signal.SIGINT)
    assert exit_reason(quiet, -signal.SIGKILL) == ""
    # The self-signal can race CPython's handler reset; that line is not the cause.
    raced = quiet + ("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
                     "OSError: Signal 15 ignored due to race condition\n")
    why = exit_reason(raced, 0)
    assert "401 Unauthorized" in why and "race condition" not in why


def test_a_round_that_failed_on_the_device_is_not_why_its_supernode_exited() -> None:
    # The round's error was said when it happened; the SuperNode exited later, when the
    # server went away (a log as a secure-only device against a plaintext server wrote it).
    round_failed = (
        "fedstream: a round failed on this device: SecureAggregationError: this device "
        "trains only under secure aggregation\n"
        "\x1b[91mERROR \x1b[0m:     ClientApp raised an exception\n"
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
        "fedstream.client.secure.SecureAggregationError: this device trains only under "
        "secure aggregation\n"
        "\x1b[91mERROR \x1b[0m:     Exit Code: 800\n\nAn unhandled exception occurred in a "
        "task process.\n\n"
        "\x1b[92mINFO \x1b[0m:      [RUN 1690]\n"
    )
    why = exit_reason(round_failed + REFUSED["replaced server"][0], 0)
    assert "401 Unauthorized" in why and "SecureAggregationError" not in why, why
    assert exit_reason(round_failed, 1) == ""


# -- the commands, before they start anything -----------------------------------------------


def test_client_refuses_a_key_that_is_not_a_node_key(work: Path) -> None:
    certs(work, "n0")
    (work / "junk.key").write_text("not a key\n")
    for key in ("junk.key", "creds/n0.pub", "creds/ca.crt"):
        done = run("client", "--server", "127.0.0.1:19799", "--state", "c0", "--client-id",
                   "0", "--config", "cfg.toml", "--key", key, cwd=work)
        assert done.returncode == 2, (key, done.stderr)
        assert f"--key {key}: not an OpenSSH private key" in " ".join(done.stderr.split())
    assert not (work / "c0").exists()


def test_a_device_state_is_its_clients_own(work: Path) -> None:
    # Two devices' --state folders swapped: each would train the other's samples and
    # learner under its own id, with nothing said.
    from fedstream.client.node import CLIENT_MARK, claim_state

    (work / "c0").mkdir()
    claim_state(work / "c0", 0)
    assert (work / "c0" / CLIENT_MARK).read_text() == "0\n"
    claim_state(work / "c0", 0)  # its own: fine, again and again
    (work / "c1").mkdir()
    (work / "c1" / CLIENT_MARK).write_text("1\n")
    done = run("client", "--server", "127.0.0.1:19799", "--state", "c1", "--client-id", "0",
               "--config", "cfg.toml", "--insecure", cwd=work)
    assert done.returncode == 2, done.stderr
    said = " ".join(done.stderr.split())
    assert f"--state {work / 'c1'} holds client 1's samples and learner, not client 0's" in said
    assert "--client-id 1" in said and not (work / "c1" / "spool.db").exists()


def test_a_state_folder_runs_one_device_whatever_it_listens_on(work: Path) -> None:
    # With --ingest on TCP, the Unix socket in --state no longer collides: two devices
    # trained from one spool and overwrote each other's secure-aggregation secrets.
    from fedstream.client.node import hold_state

    (work / "c0").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from fedstream.client.node import "
        "hold_state; hold_state(Path(sys.argv[1])); print('held', flush=True); "
        "time.sleep(600)"), str(work / "c0")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        done = run("client", "--server", "127.0.0.1:9", "--state", "c0", "--client-id", "0",
                   "--config", "cfg.toml", "--insecure", "--ingest",
                   f"127.0.0.1:{runtime.free_port()}", cwd=work)
        assert done.returncode == 2, done.stderr
        said = " ".join(done.stderr.split())
        assert f"--state {work / 'c0'} is in use by another fedstream client (pid " \
            f"{holder.pid})" in said
        assert not (work / "c0" / "spool.db").exists()  # refused before anything was opened
    finally:
        holder.kill()
        holder.wait()
    os.close(hold_state(work / "c0"))  # a killed device's lock went with it


def test_resume_without_a_checkpoint_is_refused(work: Path) -> None:
    certs(work)
    (work / "empty").mkdir()
    for state, what in (("empty", "holds no checkpoint.pkl"), ("typo", "does not exist")):
        done = run("server", "--state", state, "--credentials", "creds", "--config", "cfg.toml",
                   "--port", str(runtime.free_port()), "--resume", cwd=work)
        assert done.returncode == 2, done.stderr
        message = " ".join(done.stderr.split())
        assert str(work / state) in message and what in message, message
    assert not (work / "typo").exists() and not any((work / "empty").iterdir())


def test_a_state_that_holds_a_run_is_not_started_over_without_resume(work: Path) -> None:
    # Starting over would replace the run's checkpoint and results: refused, saying how.
    certs(work)
    (work / "srv").mkdir()
    (work / "srv" / "checkpoint.pkl").write_bytes(b"a run")
    done = run("server", "--state", "srv", "--credentials", "creds", "--config", "cfg.toml",
               "--port", str(runtime.free_port()), cwd=work)
    assert done.returncode == 2, done.stderr
    message = " ".join(done.stderr.split())
    assert "--state srv holds a run already" in message and "--resume continues it" in message
    assert (work / "srv" / "checkpoint.pkl").read_bytes() == b"a run"


def _expired_certificate(path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now - dt.timedelta(days=10)).not_valid_after(now - dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_certificates_that_cannot_work_are_refused_before_anything_starts(work: Path) -> None:
    # A device given a key as --ca, or an expired CA, would otherwise retry for ever with
    # the reason only in its SuperNode's log; a server would serve a certificate that
    # every device refuses.
    certs(work, "n0")
    _expired_certificate(work / "old.crt")
    client = ["client", "--server", "127.0.0.1:19798", "--state", "c0", "--client-id", "0",
              "--config", "cfg.toml", "--key", "creds/n0.key"]
    for ca, what in (("creds/n0.key", "not a PEM certificate"), ("old.crt", "expired on")):
        done = run(*client, "--ca", ca, cwd=work)
        assert done.returncode == 2, done.stderr
        assert f"--ca {ca}: " in done.stderr and what in " ".join(done.stderr.split())
    done = run(*client, "--insecure", cwd=work)
    assert done.returncode == 2 and "--insecure" in done.stderr
    client[client.index("--client-id") + 1] = "1"  # cfg.toml: federation.clients = 1
    done = run(*client, "--ca", "creds/ca.crt", cwd=work)
    assert done.returncode == 2, done.stderr
    assert ("--client-id 1 is not a client of this federation: federation.clients = 1 in "
            "cfg.toml (ids 0 to 0)") in " ".join(done.stderr.split())
    assert not (work / "c0").exists()
    _expired_certificate(work / "creds" / "server.pem")
    done = run("server", "--state", "srv", "--credentials", "creds", "--config", "cfg.toml",
               "--port", str(runtime.free_port()), cwd=work)
    assert done.returncode == 2, done.stderr
    assert "server.pem: the certificate expired on" in " ".join(done.stderr.split())
    assert not (work / "srv").exists()


def test_server_refuses_a_port_another_program_holds(work: Path) -> None:
    certs(work)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        started = time.monotonic()
        done = run("server", "--state", "srv", "--credentials", "creds", "--config",
                   "cfg.toml", "--port", str(port), cwd=work)
    assert done.returncode == 2, done.stderr
    assert f"port {port} on 127.0.0.1 is in use (another SuperLink?)" in done.stderr
    assert time.monotonic() - started < 15
    assert not (work / "srv").exists()


# -- with Flower's processes -----------------------------------------------------------------


def server(work: Path, state: str, port: int, *extra: str) -> subprocess.Popen:
    return fedstream("server", "--state", state, "--credentials", "creds", "--config",
                     "cfg.toml", "--port", str(port), *extra, cwd=work,
                     log=work / f"{state}.out")


def serving(work: Path, state: str) -> bool:
    return (work / state / "run-id").exists()


@pytest.mark.slow
def test_a_second_server_on_a_used_port_touches_nothing(work: Path) -> None:
    from flwr.proto.control_pb2 import ListNodesRequest, ListRunsRequest

    from fedstream.server.aggregator import Aggregator, control

    certs(work, "n0", "n1")
    port = runtime.free_port()
    first = server(work, "srv", port, "--node-key", "creds/n0.pub")
    try:
        wait_until(lambda: serving(work, "srv"), "the first server", 120)
        done = run("server", "--state", "srv2", "--credentials", "creds", "--config",
                   "cfg.toml", "--port", str(port), cwd=work)
        assert done.returncode == 2, done.stderr
        assert f"port {port} on 127.0.0.1 is in use (another SuperLink?)" in done.stderr
        assert not (work / "srv2").exists()
        ctl = control(Aggregator(work / "srv", work / "creds", port=port))
        try:  # the first SuperLink still has one run and n0's key only
            assert len(ctl.ListRuns(ListRunsRequest()).run_dict) == 1
            assert len(ctl.ListNodes(ListNodesRequest()).nodes_info) == 1
        finally:
            ctl.close()
    finally:
        kill_session(first)


# One signal each end to end (the exit codes of both are checked above, without processes):
# the server with SIGTERM, which only it receives, so that it must stop its tree itself;
# the device with a terminal's Ctrl-C, which its whole process group receives.
@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143)])
def test_stopping_the_server_stops_every_process_it_started(
    work: Path, sig: signal.Signals, code: int
) -> None:
    certs(work, "n0")
    proc = server(work, "srv", runtime.free_port())
    try:
        wait_until(lambda: serving(work, "srv"), "the server", 120)
        # The SuperLink's SuperExec starts flwr-serverapp in a session of its own.
        wait_until(lambda: any("flwr-serverapp" in command(p)
                               for p in runtime.descendants(proc.pid)), "flwr-serverapp", 60)
        tree = runtime.descendants(proc.pid)
        assert any(os.getsid(p.pid) != proc.pid for p in tree)
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
        assert proc.wait(timeout=60) == code
        assert not [p for p in tree if alive(p)]
        out = (work / "srv.out").read_text()
        assert f"stopped ({sig.name}): the SuperLink and its apps are stopped" in out, out
    finally:
        kill_session(proc)


def client(work: Path, name: str, port: int, *extra: str) -> subprocess.Popen:
    return fedstream("client", "--server", f"127.0.0.1:{port}", "--state", name,
                     "--client-id", "0", "--config", "cfg.toml", *extra, cwd=work,
                     log=work / f"{name}.out")


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130)])
def test_a_client_waits_for_its_server_and_stops_on_a_signal(
    work: Path, sig: signal.Signals, code: int
) -> None:
    certs(work, "n0")
    proc = client(work, "c0", runtime.free_port(), "--ca", "creds/ca.crt",
                  "--key", "creds/n0.key")
    out = work / "c0.out"
    try:
        wait_until(lambda: "waiting for the server" in out.read_text(), "the waiting line", 60)
        time.sleep(3)  # the SuperNode keeps retrying: the line is said once
        tree = runtime.descendants(proc.pid)
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
        assert proc.wait(timeout=60) == code
        text = out.read_text()
        assert text.count("waiting for the server at 127.0.0.1:") == 1, text
        assert "nothing answers there yet" in text
        assert f"stopped ({sig.name})" in text
        assert "fork_posix" not in text  # gRPC's fork-handler chatter
        live = [p for p in tree if alive(p)]
        # the zygote leaves at the end of its preload, when it sees its SuperExec gone
        wait_until(lambda: not any(alive(p) for p in live), "the device's processes to go", 30)
    finally:
        kill_session(proc)


@pytest.mark.slow
def test_a_client_outlives_a_replaced_server_and_says_why(work: Path) -> None:
    certs(work, "n0")
    port = runtime.free_port()
    first = server(work, "srv", port, "--node-key", "creds/n0.pub")
    procs = [first]
    out = work / "c0.out"
    try:
        wait_until(lambda: serving(work, "srv"), "the first server", 120)
        device = client(work, "c0", port, "--ca", "creds/ca.crt", "--key", "creds/n0.key")
        procs.append(device)
        wait_until(lambda: "connected to the server" in out.read_text(), "a connection", 120)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 143
        # A new server on the same address: a new database that never saw this SuperNode.
        procs.append(server(work, "srv2", port, "--node-key", "creds/n0.pub"))
        wait_until(lambda: out.read_text().count("connected to the server") == 2,
                   "the device to connect to the new server", 240)
        assert device.poll() is None, out.read_text()
        text = out.read_text()
        assert "the SuperNode exited" in text and "retrying in" in text, text
        # Flower's SuperNode ends itself on a 401 without always logging it.
        assert "401 Unauthorized" in text, text
    finally:
        for proc in procs:
            kill_session(proc)


def test_addresses_and_ports_out_of_range_are_refused_before_anything_starts(
    work: Path,
) -> None:
    certs(work, "n0")
    base = ["--state", "c0", "--client-id", "0", "--config", "cfg.toml", "--ca", "creds/ca.crt",
            "--key", "creds/n0.key"]
    for extra, said in (
        (["--server", "127.0.0.1:99999"], "--server '127.0.0.1:99999': port 99999 is not in"),
        (["--server", "127.0.0.1"], "--server '127.0.0.1': expected HOST:PORT"),
        (["--server", "127.0.0.1:9092", "--ingest", "127.0.0.1:99999"],
         "--ingest '127.0.0.1:99999': port 99999 is not in 1..65535"),
    ):
        done = run("client", *extra, *base, cwd=work)
        assert done.returncode == 2 and said in " ".join(done.stderr.split()), done.stderr
    assert not (work / "c0").exists()
    done = run("server", "--state", "srv", "--credentials", "creds", "--port", "99999", cwd=work)
    assert done.returncode == 2 and "99999" in done.stderr and not (work / "srv").exists()
    done = run("feed", "-", "--to", "127.0.0.1:99999", cwd=work)
    assert done.returncode == 2 and "port 99999 is not in 1..65535" in done.stderr


def test_a_second_device_on_one_state_is_one_line_and_exit_2(work: Path) -> None:
    from fedstream.client.ingest import serve as serve_ingestion

    certs(work, "n0")
    (work / "c0").mkdir()
    first = serve_ingestion(str(work / "c0" / "spool.db"), 8,
                            f"unix://{(work / 'c0' / 'ingest.sock').resolve()}")
    try:
        done = run("client", "--server", "127.0.0.1:19799", "--state", "c0", "--client-id",
                   "0", "--config", "cfg.toml", "--ca", "creds/ca.crt", "--key",
                   "creds/n0.key", cwd=work)
    finally:
        first.stop(None).wait()
    assert done.returncode == 2, done.stderr
    assert "another process is serving on it" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3, done.stderr


# Flower 1.42's SuperNode logs that it gives up at --max-wait-time, then lives on: the
# device must end all the same. The SuperNode's side is played by a script that writes
# what Flower writes (the real one is in test_deployment's refusals), so the test
# controls when the connection goes.
GIVES_UP = r"""
import os, sys, time
from pathlib import Path
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"  # as `fedstream client` sets it
from fedstream.client import node

state = Path(sys.argv[1])
lines = [
    "\x1b[92mINFO \x1b[0m:      SuperNode ID: 17",
    "\x1b[93mWARNING \x1b[0m:   Connection attempt failed, retrying in 0.50 seconds",
    "\x1b[93mWARNING \x1b[0m:   Giving up reconnection after 2.00 seconds and 3 tries.",
]
script = (f"import time\nfor line in {lines!r}:\n    print(line, flush=True)\n"
          "    time.sleep(1.0)\ntime.sleep(600)\n")
node.supernode_command = lambda dev, port: [sys.executable, "-c", script]
dev = node.Device(server="127.0.0.1:9", state=state, client_id=0, n_features=2,
                  max_wait=2.0, cold=True)
started = time.monotonic()
code = node.run_device(dev)
print(f"exit {code} after {time.monotonic() - started:.0f} s")
sys.exit(code)
"""


def test_a_device_that_was_connected_gives_up_at_max_wait(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", GIVES_UP, str(tmp_path / "dev")],
                          capture_output=True, text=True, timeout=120)
    said = done.stderr
    assert done.returncode == 1, (done.stdout, said)
    assert said.index("connected to the server") < said.index("lost the server")
    assert "the SuperNode gave up" in said and "not connected for 2 s (--max-wait)" in said
    assert float(done.stdout.split()[-2]) < 30  # not Flower's endless wait


# A fake SuperNode (its log lines as Flower 1.42 writes them) that loses the server, has it
# back without Flower's "Connection successful" line, then takes a message of the server's
# previous run; each start is counted in STATE/starts.
STALE = r"""
import os, sys, time
from pathlib import Path
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"
from fedstream.client import node

state = Path(sys.argv[1])
first = [
    "\x1b[92mINFO \x1b[0m:      SuperNode ID: 17",
    "\x1b[93mWARNING \x1b[0m:   Connection attempt failed, retrying in 0.50 seconds",
    "\x1b[92mINFO \x1b[0m:      Receiving: query message (ID: 67ee)",
    "\x1b[92mINFO \x1b[0m:      Received successfully",
    "\x1b[92mINFO \x1b[0m:      Run ID 92 is not in `RUNNING` status. Ignoring message 0ba0.",
]
later = ["\x1b[92mINFO \x1b[0m:      SuperNode ID: 17"]
script = (
    "import sys, time\nfrom pathlib import Path\n"
    f"starts = Path({str(state / 'starts')!r})\n"
    "n = len(starts.read_text()) if starts.exists() else 0\n"
    "starts.write_text('x' * (n + 1))\n"
    f"for line in ({first!r} if n == 0 else {later!r}):\n"
    "    print(line, flush=True)\n    time.sleep(0.5)\ntime.sleep(600)\n"
)
node.supernode_command = lambda dev, port: [sys.executable, "-c", script]
dev = node.Device(server="127.0.0.1:9", state=state, client_id=0, n_features=2, cold=True)
sys.exit(node.run_device(dev))
"""


def test_a_device_says_it_is_back_and_replaces_a_supernode_left_a_message_behind(
    tmp_path: Path,
) -> None:
    state = tmp_path / "dev"
    proc = subprocess.Popen([sys.executable, "-c", STALE, str(state)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (state / "starts").exists()
                   and len((state / "starts").read_text()) == 2, "a second SuperNode", 60)
        time.sleep(1.0)  # its first line heard
        proc.send_signal(signal.SIGTERM)
        _, said = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, said
    lines = [line for line in said.splitlines() if line]
    assert [line.split(" at ")[0].split(":")[0] for line in lines[:5]] == [
        "connected to the server", "lost the server",
        "connected to the server",  # back: traffic, though Flower did not say it reconnected
        "the SuperNode took a message of the server's previous run (the server restarted "
        "mid-round), which would leave it one message behind in every round",
        "connected to the server",  # the new SuperNode
    ], said
