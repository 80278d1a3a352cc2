#!/bin/sh
# Compose (file-based secrets) and plain bind mounts keep the host's owner and mode 0600,
# which the unprivileged e2llm user cannot read. As root: copy /run/secrets/* to
# $E2LLM_SECRETS readable by e2llm only, then run the command as e2llm.
set -eu
if [ "$(id -u)" = 0 ]; then
    install -d -o e2llm -g e2llm -m 0700 "$E2LLM_SECRETS"
    for f in /run/secrets/*; do
        if [ -f "$f" ]; then install -o e2llm -g e2llm -m 0400 "$f" "$E2LLM_SECRETS/"; fi
    done
    exec setpriv --reuid=e2llm --regid=e2llm --init-groups "$@"
fi
exec "$@"
