"""Bounds of the guest channel: the largest argv, env, stdin, output chunk,
file and text any message may carry, and the output stream numbers.

The guest channel's messages (protocol/channel/messages.py) are built from
these; the caller's protocol (protocol/wire/tasks.py) reuses them, so a
request the daemon accepts always fits the Exec it becomes. The guest agent
cuts its own texts to them. Ships in the guest: no imports at all.
"""

KiB = 1024
MiB = 1024 * KiB

MAX_AGENT_VERSION_LEN = 64
MAX_BOOT_ID_LEN = 64
MAX_KERNEL_LEN = 128

MAX_ARGV_ITEMS = 4096
MAX_ARG_LEN = 128 * KiB
MAX_ENV_ITEMS = 1024
MAX_ENV_KEY_LEN = 4 * KiB
MAX_ENV_VALUE_LEN = 128 * KiB
MAX_CWD_LEN = 4096
MAX_STDIN = 8 * MiB  # all stdin of one exec: Exec.stdin and every Stdin chunk together
MAX_STDIN_CHUNK = 64 * KiB  # one Stdin message

MAX_OUTPUT_CHUNK = 1 * MiB  # the guest splits output into chunks of at most this
STDOUT = 1
STDERR = 2

MAX_RESET_DETAIL_LEN = 1024
# Files put into the guest before a run and collected after it (protocol/wire/tasks.py
# carries them from the caller; config caps the totals far below these bounds).
MAX_FILES = 64
MAX_PATH_LEN = 4096
MAX_FILE_IN = 12 * MiB  # one PutFile must fit one frame with room to spare
MAX_FILE_ERROR_LEN = 512
MAX_ERROR_CODE_LEN = 64
MAX_ERROR_MESSAGE_LEN = 4096
# Random bytes a Resume carries for the guest's CRNG: exactly this many, 256 bits.
RESUME_ENTROPY_LEN = 32
