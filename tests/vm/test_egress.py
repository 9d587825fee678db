"""Egress policy against real VMs (docs/egress.md, issue 17).

The "internet" is a network namespace on this machine (tests/support/internet.py):
allowed.test and denied.test serve HTTPS with a test CA, an echo server and a
DNS server answer on documentation addresses, and every connection and DNS
question they get is recorded, so "never reached" is checked at the servers.
No packet goes to any other address.

Through the real corrald (a net tier of one VM, so tasks in a row share it):
the task user's HTTPS GET to an allowed name works; everything else is refused
by the proxy (403 naming why), never reaches its server, and asks no DNS for a
name no rule allows. As root in the guest (the test-only as_root Exec on a VM
of the net tier, its egress port served by the same EgressProxy corrald uses):
changing the resolver, adding addresses, bypassing or replacing the relay opens
nothing. Probes run in the guest as one Python script each (PROBE) printing
JSON, so a test costs one task, not one per probe.
"""

import json
import logging
import subprocess
import sys

import pytest

import config
from actors.egress.proxy import EgressProxy, EgressSettings, TaskEgress
from actors.egress.rules import host_addresses, parse_rules
from actors.vm.host import Hypervisor
from protocol.client.api import Client
from tests.support import internet
from tests.support.host import STATE_DIR, TEST_INSTANCE
from tests.support.service import counter, service_config, start_service
from tests.support.vm import BootedVm
from tests.support.waiting import wait_until

pytestmark = pytest.mark.vm

CA_PATH = "/tmp/ca.pem"
GRANTED = ["allowed.test", "rebind.test", "private.test", "metadata.test", "host.test",
           f"{internet.ECHO_IP}:7", "0.0.0.0/0:1-65535"]

# Both guest scripts below start with this: what a direct TCP connection comes to.
DIRECT = r"""
import errno, socket

def direct(ip, port):
    try:
        socket.create_connection((ip, port), timeout=5).close()
        return "connected"
    except OSError as e:
        return f"ERR {errno.errorcode.get(e.errno, e.errno)}"
"""

# Runs in the guest: argv[1] is a JSON list of [name, probe, *args]; prints {name: result}.
PROBE = DIRECT + r"""
import errno, json, os, socket, ssl, struct, sys, urllib.request
CA = "/tmp/ca.pem"
PROXY = ("127.0.0.1", 3128)

def https_get(url):
    try:
        context = ssl.create_default_context(cafile=CA)
        return urllib.request.urlopen(url, context=context, timeout=30).read().decode()
    except Exception as e:
        return f"ERR {type(e).__name__}: {e}"

def http_get(url):
    try:
        return urllib.request.urlopen(url, timeout=30).read().decode()
    except Exception as e:
        return f"ERR {type(e).__name__}: {e}"

def proxy_connect(target, then="", sni=""):
    s = socket.create_connection(PROXY, timeout=30)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        data = s.recv(4096)
        if not data:
            break
        head += data
    status, _, body = head.partition(b"\r\n\r\n")
    status = status.split(b"\r\n")[0].decode()
    if " 200 " not in status:
        try:
            body += s.recv(4096)
        except OSError:
            pass
        return status + " | " + body.decode(errors="replace").strip()
    try:
        if then == "tls":
            context = ssl.create_default_context(cafile=CA)
            t = context.wrap_socket(s, server_hostname=sni)
            t.sendall(f"GET / HTTP/1.1\r\nHost: {sni}\r\n\r\n".encode())
            return status + " | " + t.recv(4096).decode().split("\r\n\r\n")[-1].strip()
        if then == "echo":
            s.sendall(b"ping")
            return status + " | " + s.recv(100).decode()
    except Exception as e:
        return status + f" | ERR {type(e).__name__}: {e}"
    return status

def resolve(name):
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(name, 443)})
    except OSError as e:
        return f"ERR {type(e).__name__}"

def dns_direct(server, name):
    query = struct.pack("!HHHHHH", 0x1717, 0x0100, 1, 0, 0, 0) + b"".join(
        bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0\0\1\0\1"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        s.sendto(query, (server, 53))
        return "answered " + s.recv(512).hex()
    except OSError as e:
        return f"ERR {errno.errorcode.get(e.errno, type(e).__name__)}"

def boot_id():
    return open("/proc/sys/kernel/random/boot_id").read().strip()

def env(name):
    return os.environ.get(name, "")

def system_cas():
    return len(ssl.create_default_context().get_ca_certs())

results = {}
for name, probe, *args in json.loads(sys.argv[1]):
    results[name] = globals()[probe](*args)
print(json.dumps(results))
"""


def probes(**named) -> str:
    return json.dumps([[name, *spec] for name, spec in named.items()])


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    made = internet.start(TEST_INSTANCE, tmp_path_factory.mktemp("internet"))
    yield made
    internet.stop(TEST_INSTANCE, made)


@pytest.fixture(scope="module")
def service(hypervisor, net, tmp_path_factory):
    """corrald whose net tier is one warm VM, its proxy asking the test DNS, and
    the local identity granted GRANTED (not denied.test)."""
    cfg = service_config(tmp_path_factory.mktemp("corrald"), pool={"size": 1, "tier_size": 1, "tier_max": 1},
                         egress={"resolver": internet.DNS_IP},
                         identity={"local_egress_allow": GRANTED})
    svc = start_service(cfg, hypervisor)
    try:
        wait_until(lambda: sum(1 for vm in svc.directory.get("pool").proxy().state.get(timeout=5).vms.values()
                               if vm.state == "ready" and vm.tier.network) == 1, 180, "a warm net:egress VM")
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def client(service):
    with Client(service.cfg.daemon.endpoint) as c:
        yield c


def run_probes(client, net, rules, **named) -> dict:
    reply = client.run(["python3", "-", probes(**named)], stdin=PROBE.encode(),
                       capabilities=["net:egress", "dev:python"], egress_allow=rules,
                       files_in=[(CA_PATH, net.ca_pem, 0o644)], timeout_s=120, wait_s=300)
    assert (reply.error_code, reply.exit_code) == ("", 0), (reply.error_message, reply.stderr.decode()[-2000:])
    return json.loads(reply.stdout)


def test_with_allow_allowed_test_an_https_get_works_and_denied_test_does_not(client, net, service, caplog):
    since = net.mark()
    caplog.set_level(logging.INFO, logger="corral.egress")
    allowed, denied = (counter(service.metrics.egress_connections, verdict=v) for v in ("allowed", "denied"))
    got = run_probes(client, net, ["allowed.test"],
                     https=["https_get", "https://allowed.test/"],
                     http=["http_get", "http://allowed.test/"],
                     denied=["https_get", "https://denied.test/"],
                     proxy_env=["env", "https_proxy"],
                     system_cas=["system_cas"])
    assert got["https"] == "allowed over https\n"
    assert got["http"] == "allowed over http\n"  # plain HTTP: absolute-form through the proxy
    assert got["denied"].startswith("ERR") and "403" in got["denied"], got["denied"]
    assert got["proxy_env"] == "http://127.0.0.1:3128"
    assert got["system_cas"] > 100  # ca-certificates: real sites verify without a CA of the caller's
    assert len(net.seen("tcp", since, address=internet.ALLOWED_IP)) == 2 and net.seen("dns", since, name="allowed.test")
    assert net.seen("tcp", since, address=internet.DENIED_IP) == []
    assert net.seen("dns", since, name="denied.test") == []  # a name no rule allows is never even looked up
    assert counter(service.metrics.egress_connections, verdict="allowed") == allowed + 2
    assert counter(service.metrics.egress_connections, verdict="denied") == denied + 1
    lines = [r.getMessage() for r in caplog.records if r.name == "corral.egress"]
    assert any(line.startswith("egress allowed: task ") and " identity local " in line
               and "-> allowed.test:443 [203.0.113.10]" in line for line in lines), lines
    assert any(line.startswith("egress denied: task ") and "-> denied.test:443" in line
               and "no rule allows denied.test:443" in line for line in lines), lines


def test_an_sni_of_allowed_test_aimed_at_the_denied_address_fails(client, net):
    since = net.mark()
    got = run_probes(client, net, ["allowed.test"],
                     to_denied_ip=["proxy_connect", f"{internet.DENIED_IP}:443", "tls", "allowed.test"],
                     # The other way round: the proxy connects where the CONNECT said, whatever the SNI.
                     sni_denied=["proxy_connect", "allowed.test:443", "tls", "denied.test"])
    assert got["to_denied_ip"].startswith("HTTP/1.1 403") and f"no rule allows {internet.DENIED_IP}:443" in \
        got["to_denied_ip"]
    assert got["sni_denied"] == "HTTP/1.1 200 Connection established | allowed over https"
    assert net.seen("tcp", since, address=internet.DENIED_IP) == []
    assert len(net.seen("tcp", since, address=internet.ALLOWED_IP, port=443)) == 1


def test_raw_tcp_to_the_denied_address_fails_and_an_address_rule_opens_only_itself(client, net):
    since = net.mark()
    got = run_probes(client, net, ["allowed.test"],
                     proxied=["proxy_connect", f"{internet.ECHO_IP}:7", "echo"],
                     direct=["direct", internet.ECHO_IP, 7],
                     direct_denied=["direct", internet.DENIED_IP, 443])
    assert got["proxied"].startswith("HTTP/1.1 403")
    assert got["direct"] == got["direct_denied"] == "ERR ENETUNREACH"  # no NIC, no route: nothing but lo
    assert net.seen("tcp", since, address=internet.ECHO_IP) == []
    opened = run_probes(client, net, [f"{internet.ECHO_IP}:7"],
                        echo=["proxy_connect", f"{internet.ECHO_IP}:7", "echo"],
                        other_port=["proxy_connect", f"{internet.ECHO_IP}:443"])
    assert opened["echo"] == "HTTP/1.1 200 Connection established | ping"
    assert opened["other_port"].startswith("HTTP/1.1 403")


def test_the_hosts_addresses_metadata_and_private_ranges_fail_whatever_the_rules(client, net, service):
    host_v4 = sorted(str(a) for a in host_addresses() if a.version == 4 and not a.is_loopback)
    assert internet.HOST_END in host_v4
    targets = {f"host_{i}": ["proxy_connect", f"{a}:22"] for i, a in enumerate(host_v4)}
    got = run_probes(client, net, ["0.0.0.0/0:1-65535", "rebind.test", "private.test", "metadata.test", "host.test"],
                     loopback=["proxy_connect", f"127.0.0.1:{service.metrics_port}"],
                     metadata=["proxy_connect", "169.254.169.254:80"],
                     private=["proxy_connect", "10.1.2.3:443"],
                     rebind=["proxy_connect", "rebind.test:443"],
                     private_name=["proxy_connect", "private.test:443"],
                     metadata_name=["proxy_connect", "metadata.test:80"],
                     host_name=["proxy_connect", "host.test:443"],
                     still_open=["proxy_connect", f"{internet.ECHO_IP}:7", "echo"],
                     **targets)
    assert got.pop("still_open") == "HTTP/1.1 200 Connection established | ping"  # the rule itself works
    for name, result in got.items():
        assert result.startswith("HTTP/1.1 403"), (name, result)
    assert "is an address of this host" in got["host_0"]
    assert "169.254.0.0/16, which is never reachable" in got["metadata"]
    assert "private range 10.0.0.0/8" in got["private"] and "resolves to 10.1.2.3" in got["private_name"]
    assert "resolves to 127.0.0.1" in got["rebind"] and "resolves to 169.254.169.254" in got["metadata_name"]
    assert f"resolves to {internet.HOST_END}" in got["host_name"]


def test_dns_in_the_guest_leads_nowhere(client, net):
    since = net.mark()
    got = run_probes(client, net, ["allowed.test"],
                     resolve_denied=["resolve", "denied.test"],
                     resolve_allowed=["resolve", "allowed.test"],
                     ask_the_server=["dns_direct", internet.DNS_IP, "denied.test"],
                     through_proxy=["proxy_connect", "denied.test:443"])
    assert got["resolve_denied"].startswith("ERR") and got["resolve_allowed"].startswith("ERR")
    assert got["ask_the_server"] == "ERR ENETUNREACH"
    assert got["through_proxy"].startswith("HTTP/1.1 403")
    assert net.seen("dns", since, name="denied.test") == []


def test_a_rule_change_takes_effect_for_the_next_task_on_the_same_vm(client, net):
    first = run_probes(client, net, ["allowed.test"], get=["https_get", "https://allowed.test/"], vm=["boot_id"])
    second = run_probes(client, net, [], get=["https_get", "https://allowed.test/"], vm=["boot_id"])
    assert first["vm"] == second["vm"]  # the tier's one VM, reset between the tasks
    assert first["get"] == "allowed over https\n"
    assert "403" in second["get"]  # no rules: egress.default_allow, empty


def session_probes(session, **named) -> dict:
    reply = session.exec(["python3", "-", probes(**named)], stdin=PROBE.encode(), timeout_s=120, wait_s=300)
    assert (reply.error_code, reply.exit_code) == ("", 0), (reply.error_message, reply.stderr.decode()[-2000:])
    return json.loads(reply.stdout)


def test_a_net_egress_session_keeps_its_rules_through_pause_resume_and_fork(client, net):
    """The session's VM is saved with its egress port's connection to the
    proxy, and each restored VM's relay takes the new proxy's: the resumed
    session and its fork reach allowed.test and nothing else, as before."""
    with client.session(["net:egress", "dev:python"], egress_allow=["allowed.test"]) as session:
        session.put(CA_PATH, net.ca_pem)
        wanted = dict(get=["https_get", "https://allowed.test/"], denied=["https_get", "https://denied.test/"])
        before = session_probes(session, **wanted)
        session.pause()
        session.resume()
        (fork,) = session.fork(1)
        with fork:
            for seen in (before, session_probes(session, **wanted), session_probes(fork, **wanted)):
                assert seen["get"] == "allowed over https\n", seen
                assert seen["denied"].startswith("ERR") and "403" in seen["denied"], seen


def test_a_rule_outside_the_grants_is_capability_denied_naming_it(client, service):
    reply = client.run(["true"], capabilities=["net:egress"], egress_allow=["allowed.test", "denied.test"],
                       wait_s=30)
    assert reply.error_code == "capability_denied"
    assert "egress rule 'denied.test' is not granted to identity 'local'" in reply.error_message
    bad = client.run(["true"], egress_allow=["allowed.test"], wait_s=30)
    assert bad.error_code == "invalid_request" and "need capability net:egress" in bad.error_message


def test_the_cli_takes_allow(service, net, tmp_path):
    (tmp_path / "ca.pem").write_bytes(net.ca_pem)
    script = ("import ssl, urllib.request; c = ssl.create_default_context(cafile='/tmp/ca.pem'); "
              "print(urllib.request.urlopen('https://allowed.test/', context=c, timeout=30).read().decode(), end='')")
    done = subprocess.run([sys.executable, "-m", "protocol.client", "run", "--endpoint", service.cfg.daemon.endpoint,
                           "--cap", "net:egress", "--cap", "dev:python", "--allow", "allowed.test",
                           "--put", f"{tmp_path / 'ca.pem'}:{CA_PATH}", "--", "python3", "-c", script],
                          capture_output=True, timeout=300)
    assert (done.stdout, done.returncode) == (b"allowed over https\n", 0), done.stderr
    refused = subprocess.run([sys.executable, "-m", "protocol.client", "run", "--endpoint",
                              service.cfg.daemon.endpoint, "--cap", "net:egress", "--allow", "denied.test",
                              "--", "true"], capture_output=True, timeout=60)
    assert refused.returncode == 125 and b"capability_denied" in refused.stderr and b"denied.test" in refused.stderr


# --- root in the guest --------------------------------------------------------------

# As root: point the resolver at the test DNS, put the denied addresses on lo,
# then try everything directly, through the proxy, and past the relay on the
# egress port itself with frames of its own.
ROOT_ATTACK = DIRECT + r"""
import errno, fcntl, json, os, signal, socket, struct, sys, time, zlib
sys.path.insert(0, "/opt/corral")
from protocol.channel import codec
from protocol.channel.egress import PORT_NAME, StreamData, StreamOpen, HOST_SENDS
from protocol.channel.frame import FrameDecoder, FrameEncoder
DENIED, ECHO, DNS, HOST_END = sys.argv[1:5]
out = {}

# The resolver: root may write it; there is no route to any server.
with open("/etc/resolv.conf", "w") as f:
    f.write(f"nameserver {DNS}\n")
try:
    out["resolve"] = socket.getaddrinfo("denied.test", 443)[0][4][0]
except OSError as e:
    out["resolve"] = f"ERR {type(e).__name__}"
# Routes: the only interface is lo. Give it the denied addresses: they are this guest's now.
SIOCSIFADDR = 0x8916
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for i, ip in enumerate((DENIED, ECHO)):
        ifreq = struct.pack("16sH2s4s8x", f"lo:{i + 1}".encode(), socket.AF_INET, b"\0\0", socket.inet_aton(ip))
        fcntl.ioctl(s.fileno(), SIOCSIFADDR, ifreq)
out["routes"] = open("/proc/net/route").read().strip().splitlines()[1:]
for name, ip, port in (("denied", DENIED, 443), ("echo", ECHO, 7), ("metadata", "169.254.169.254", 80),
                       ("host", HOST_END, 80), ("dns", DNS, 53)):
    out[f"direct_{name}"] = direct(ip, port)

def proxy_connect(target):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=30)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
    answer = b""
    while data := s.recv(4096):  # to the proxy's close: the relay then sends nothing more for it
        answer += data
    return answer.decode(errors="replace").split("\r\n")[0]
out["proxy_denied"] = proxy_connect(f"{DENIED}:443")
out["proxy_denied_name"] = proxy_connect("denied.test:443")
# Each of those was two frames each way on the port (open and request; answer and
# close): a root that watched the port continues both sequences from there.
SEQ = 4

# Past the relay: kill it, open the egress port, speak the frames.
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"egress_relay" in cmd:
            os.kill(int(pid), signal.SIGKILL)
time.sleep(0.5)
port = next(f"/dev/{e}" for e in os.listdir("/sys/class/virtio-ports")
            if open(f"/sys/class/virtio-ports/{e}/name").read().strip() == PORT_NAME)
fd = os.open(port, os.O_RDWR)
encoder, decoder = FrameEncoder(zlib.crc32, first_seq=SEQ), FrameDecoder(zlib.crc32, first_seq=SEQ)
for message in (StreamOpen(stream=1000), StreamData(stream=1000, data=f"CONNECT {DENIED}:443 HTTP/1.1\r\n\r\n".encode())):
    os.write(fd, encoder.encode(codec.encode(message)))
answer = b""
deadline = time.monotonic() + 20
while b"\r\n" not in answer and time.monotonic() < deadline:
    data = os.read(fd, 65536)
    for payload in decoder.feed(data):
        message = codec.decode(payload, HOST_SENDS)
        if isinstance(message, StreamData):
            answer += message.data
out["own_frames"] = answer.decode(errors="replace").split("\r\n")[0]
if len(sys.argv) > 5:  # then garble the port: the host must take it as a violation
    os.write(fd, b"\0" * 64)
print(json.dumps(out))
"""


@pytest.fixture
def root_vm(net):
    """A VM of the net tier and the EgressProxy corrald uses (the real always-denied
    set), its task allowed allowed.test. Its own instance name: the module's
    corrald would reap a VM of its own instance that it does not own."""
    violations = []
    cfg = config.load(overrides={"state_dir": str(STATE_DIR), "daemon": {"instance": f"{TEST_INSTANCE}root"[:16]}})
    hypervisor = Hypervisor.from_config(cfg)
    proxy = EgressProxy(EgressSettings(resolver=(internet.DNS_IP, 53)))
    proxy.start()
    vm = BootedVm(hypervisor, cfg.vm.boot_timeout_s, network=True)
    try:
        proxy.attach("root-test", vm.handle.egress_socket, lambda code, detail: violations.append((code, detail)))
        proxy.begin_task("root-test", TaskEgress("root-task", "test", parse_rules(["allowed.test"])))
        yield vm, violations
    finally:
        vm.destroy()
        proxy.stop()
        hypervisor.close()


def test_root_in_the_guest_changing_resolver_and_routes_and_replacing_the_relay_widens_nothing(root_vm, net):
    since = net.mark()
    vm, violations = root_vm
    result = vm.run("python3", "-", internet.DENIED_IP, internet.ECHO_IP, internet.DNS_IP, internet.HOST_END,
                    stdin=ROOT_ATTACK.encode(), as_root=True, timeout_s=120)
    assert result.exit.exit_code == 0, result.stderr.decode()[-3000:]
    got = json.loads(result.stdout)
    assert got["resolve"].startswith("ERR")
    assert all(route.split()[0] == "lo" for route in got["routes"]), got["routes"]  # lo is all there is
    assert got["direct_denied"] == "ERR ECONNREFUSED"  # the guest's own lo now, not the server
    assert got["direct_echo"] == "ERR ECONNREFUSED"
    for name in ("metadata", "host", "dns"):
        assert got[f"direct_{name}"] == "ERR ENETUNREACH", (name, got)
    assert got["proxy_denied"].startswith("HTTP/1.1 403") and got["proxy_denied_name"].startswith("HTTP/1.1 403")
    assert got["own_frames"].startswith("HTTP/1.1 403")  # the host decides, whoever speaks the port
    assert net.seen("tcp", since, address=internet.DENIED_IP) == []
    assert net.seen("tcp", since, address=internet.ECHO_IP) == []
    assert net.seen("dns", since, name="denied.test") == []
    assert violations == []


def test_a_guest_that_garbles_the_egress_port_is_reported_as_a_violation(root_vm, net):
    vm, violations = root_vm
    result = vm.run("python3", "-", internet.DENIED_IP, internet.ECHO_IP, internet.DNS_IP, internet.HOST_END,
                    "garble", stdin=ROOT_ATTACK.encode(), as_root=True, timeout_s=120)
    assert result.exit.exit_code == 0, result.stderr.decode()[-3000:]
    wait_until(lambda: violations, 10, "the violation reported")
    assert "egress port" in violations[0][1]
