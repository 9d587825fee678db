"""corral's host side: corrald, its actors, and the layers they stand on.

Where a reader starts
    daemon.py       corrald: start-up checks, then serves until SIGINT/SIGTERM
    service.py      Corral: builds the supervision tree from a Config, takes it down
    root.py         Root: the top of the tree; restarts a failed actor with its state

The actors (pykka, a thread each; they meet only by messages, never waiting on one another)
    intake.py       Intake: every answer passes it on its way to the IntakeServer thread
    scheduler.py    Scheduler: the priority queue between Intake and the warm pool
    pool.py         PoolManager: keeps the warm VMs, one Supervisor each
    supervisor.py   Supervisor: one VM's life, the task on it, its deadlines
    ioguard.py      IOGuard: the one reader of every guest channel, rate-limited
    watchdog.py     Watchdog: actors alive, host memory, zombie domains

Their plain logic (no threads, no actors: unit-tested alone)
    ready_queue.py  the Scheduler's queue: what runs next on which VM
    pool_plan.py    the PoolManager's table: what to boot, what to retire
    replies.py      the answer built from a finished task

Plumbing
    refill.py       how a new VM is made: a snapshot clone, a template build, a cold
                    boot; one shared by every Supervisor (blocking, thread-safe)
    messages.py     every message between actors: small, named, immutable
    directory.py    name -> ActorRef, updated on restarts; the one answer path
    timers.py       one timer thread for every deadline
    errors.py       the host's own failures, each with a code

Layers (sub-packages; each __init__ says more)
    vm/             the hypervisor (libvirt, QMP), the host's end of a guest
                    channel, hardware tiers
    edge/           what faces callers and operators: the IntakeServer and control
                    sockets, identities and budgets, connection limits, metrics
    artifacts/      files into and out of a VM, and the host key that signs them

bench.py measures the whole (scripts/bench).

What may import what
    protocol/ and config/ import nothing of actors/.
    errors.py imports nothing; messages.py, directory.py and timers.py import
    each other, vm/tiers.py and protocol/.
    vm/ and artifacts/ import errors.py and protocol/ (vm/ also guest/image/),
    never an actor, edge/ or each other.
    edge/ imports the plumbing, artifacts/, protocol/ and config/; never vm/ nor
    an actor module: it is handed what it needs (a Directory, the service) and
    tells actors messages.
    refill.py imports vm/, errors.py and edge/metrics.py; never an actor module.
    The plain-logic modules import the plumbing, vm/tiers.py, artifacts/ and
    protocol/; never an actor module.
    An actor module imports any of those, never another actor module (actors
    reach each other through the Directory). service.py, root.py, daemon.py
    and bench.py wire everything together and are imported by nothing here
    but each other.
"""
