"""Other hosts, over SSH (paramiko): the connection (ssh.py: host keys checked against
known_hosts) and the other host's vmckpt agent reached through it (endpoint.py). What is done
there — copying layers, restoring, migrating — is vmckpt/mechanisms/remote.py and
migrate.py; a guest that runs there is vmckpt/guests/remote.py."""

DEFAULT_REMOTE_STORE = ".vmckpt/store"  # the store on another host: relative to its home
