#!/bin/sh
# Runs inside the eclipse-mosquitto container (compose.yaml).
#   broker.sh start    copy the broker's files into place, then run Mosquitto (PID 1)
#   broker.sh reload   copy them again and have Mosquitto re-read its ACL, CRL and
#                      certificates (SIGHUP), after `e2llm broker revoke|add-device|renew`
# The files are mounted read-only from broker/secrets/, owned by the host user with mode
# 0600; Mosquitto drops root and reads them as user mosquitto, so they are copied where
# only that user can read them.
set -eu
copy() {
    install -d -o mosquitto -g mosquitto -m 0700 /mosquitto/config/secrets
    for f in ca.crt broker.crt broker.key crl.pem acl; do
        install -o mosquitto -g mosquitto -m 0600 "/e2llm/secrets/$f" /mosquitto/config/secrets/
    done
}
case "${1:-start}" in
    start)
        copy
        chown -R mosquitto:mosquitto /mosquitto/data
        exec mosquitto -c /e2llm/mosquitto.conf
        ;;
    reload)
        copy
        kill -HUP 1
        echo "mosquitto reloaded its ACL, CRL and certificates"
        ;;
    *)
        echo "usage: broker.sh start|reload" >&2
        exit 2
        ;;
esac
