#!/bin/sh
# One-shot: the keys, certificates and passwords of the compose stack, made once into the
# `secrets` volume (compose.yaml's `secrets` service runs this; nothing is overwritten):
#   daemon/      root:65532 0750   the daemon (uid 65532) reads it, Prometheus cannot enter
#     daemon.key_secret  0400  the daemon's CURVE secret certificate (esper-telemetry keygen)
#     daemon.key         0444  its public key: give it to every collector
#     tls.crt 0444, tls.key 0400   the server certificate (DNS:esper-telemetryd, localhost)
#     web-config.yml     0400  TLS and the bcrypt hash of Prometheus' password
#   prometheus/  root:65534 0750   Prometheus (nobody, 65534) reads it, the daemon cannot
#     ca.crt 0444, password 0400
#   ca/          root 0700         the CA that signed tls.crt (sign other certificates with it)
# Run as root (to hand each file to its reader); elsewhere (tests) it only skips the chown.
set -eu
umask 077
root=${SECRETS_DIR:-/secrets}
d=$root/daemon p=$root/prometheus ca=$root/ca
command -v openssl >/dev/null || { echo "secrets.sh: openssl not found" >&2; exit 1; }
mkdir -p "$d" "$p" "$ca"

if [ ! -e "$d/daemon.key_secret" ]; then
    esper-telemetry keygen "$d" daemon
fi

if [ ! -e "$d/tls.crt" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
        -keyout "$ca/ca.key" -out "$ca/ca.crt" -subj "/CN=esper-telemetry compose CA" 2>/dev/null
    printf 'subjectAltName=DNS:esper-telemetryd,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' \
        > "$ca/server.ext"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$d/tls.key" -out "$ca/server.csr" -subj "/CN=esper-telemetryd" 2>/dev/null
    openssl x509 -req -in "$ca/server.csr" -CA "$ca/ca.crt" -CAkey "$ca/ca.key" \
        -CAcreateserial -days 825 -extfile "$ca/server.ext" -out "$d/tls.crt" 2>/dev/null
    cp "$ca/ca.crt" "$p/ca.crt"
fi

if [ ! -e "$d/web-config.yml" ]; then
    # A random scrape password; the daemon keeps only its bcrypt hash.
    python -c 'import secrets; print(secrets.token_urlsafe(24), end="")' > "$p/password"
    hash=$(python -c 'import bcrypt, sys; print(bcrypt.hashpw(sys.stdin.buffer.read(), bcrypt.gensalt(10)).decode())' < "$p/password")
    cat > "$d/web-config.yml" <<YAML
# Made by deploy/docker/secrets.sh. Paths are relative to this file's folder.
tls_server_config:
  cert_file: tls.crt
  key_file: tls.key
  min_version: TLS12
basic_auth_users:
  prometheus: '$hash'
YAML
fi

chmod 0400 "$d/daemon.key_secret" "$d/tls.key" "$d/web-config.yml" "$p/password"
chmod 0444 "$d/daemon.key" "$d/tls.crt" "$p/ca.crt"
chmod 0750 "$d" "$p"
chmod 0700 "$ca"
chmod 0755 "$root"
if [ "$(id -u)" = 0 ]; then
    chown 65532:65532 "$d"/*
    chown root:65532 "$d"
    chown 65534:65534 "$p"/*
    chown root:65534 "$p"
fi
echo "secrets.sh: keys and certificates ready in $root"
