#!/bin/sh
# Identity directories (and any other secrets) are bind-mounted under /run/secrets with
# the host's owner and mode 0600, which the unprivileged e2llm user cannot read. As root:
# copy /run/secrets/ to $E2LLM_SECRETS readable by e2llm only, then run the command as e2llm.
set -eu
if [ "$(id -u)" = 0 ]; then
    install -d -o e2llm -g e2llm -m 0700 "$E2LLM_SECRETS"
    if [ -d /run/secrets ]; then
        cp -R /run/secrets/. "$E2LLM_SECRETS/"
        chown -R e2llm:e2llm "$E2LLM_SECRETS"
        chmod -R go= "$E2LLM_SECRETS"
    fi
    exec setpriv --reuid=e2llm --regid=e2llm --init-groups "$@"
fi
exec "$@"
