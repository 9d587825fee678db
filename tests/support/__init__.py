"""What more than one test module needs, so that no test module imports another.

waiting   wait_until: poll a condition with a deadline
probe     Recorder: an actor that records what it is told, and wait_for on it
host      this host as tests use it: STATE_DIR, instance names, another user, ports, processes
vm        BootedVm (one real VM and its link), make_spec (a DomainSpec without libvirt)
service   the one way to build corrald's supervision tree in a test: service_config,
          start_service, running_service, and what tests read from it
corrald   a real corrald process: site files, start, readiness, --check
intake    the task limits and requests Intake tests use, a CurveZMQ config
fake_corrald  a scripted ROUTER standing in for corrald, for the client's tests
flood     the connection flooder (a child process) and how a test starts it
fuzz      the fuzz targets and their properties (tests/unit/test_fuzz.py, scripts/fuzz)

May import corral's own packages; never a test module, and never pytest fixtures
(those live in the conftest.py files)."""
