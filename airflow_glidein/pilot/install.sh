#!/bin/sh
# install.sh: bake the glidein pilot into a VM image (see docker/vm-image/README.md).
#
# Usage: install.sh [--root DIR] [--pubkey FILE] [--previous-pubkey FILE] [--image-key FILE] [--sources "..."] [--no-enable]
#   --root       the image's root file system (default /: run inside the builder VM)
#   --pubkey     the factory's public key (python -m airflow_glidein pubkey > factory.pub)
#   --previous-pubkey  during a signing key rotation, the other key the image accepts (factory.pub.previous);
#                without it an earlier factory.pub.previous is removed
#   --image-key  the image's X25519 private key, for entries with encrypt_userdata
#                (openssl genpkey -algorithm X25519 -out userdata.key); installed root-only, mode 600
#   --sources where this image's clouds put UserData, in order (default: every middleware)
# HTCondor itself (condor_master on PATH) is installed separately.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=/ pubkey="" previous="" imagekey="" sources="" enable=yes
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root=$2; shift 2 ;;
        --pubkey) pubkey=$2; shift 2 ;;
        --previous-pubkey) previous=$2; shift 2 ;;
        --image-key) imagekey=$2; shift 2 ;;
        --sources) sources=$2; shift 2 ;;
        --no-enable) enable=no; shift ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
for f in "$pubkey" "$previous"; do
    [ -z "$f" ] || grep -q "^-----BEGIN PUBLIC KEY-----" "$f" \
        || { echo "install.sh: $f is not a PEM public key (python -m airflow_glidein pubkey)" >&2; exit 2; }
done
[ -z "$previous" ] || [ -n "$pubkey" ] || { echo "install.sh: --previous-pubkey needs --pubkey" >&2; exit 2; }
lib=$root/usr/libexec/glidein
mkdir -p "$lib" "$root/etc/glidein" "$root/etc/systemd/system"
for f in glidein-wrapper.sh glidein-lib.sh ed25519_verify.py x25519_open.py; do
    install -m 0755 "$here/$f" "$lib/$f"
done
install -m 0644 "$here/glidein-pilot.service" "$root/etc/systemd/system/glidein-pilot.service"
if [ -n "$pubkey" ]; then
    install -m 0644 "$pubkey" "$root/etc/glidein/factory.pub"
    if [ -n "$previous" ]; then
        install -m 0644 "$previous" "$root/etc/glidein/factory.pub.previous"
    else
        rm -f "$root/etc/glidein/factory.pub.previous"
    fi
elif [ ! -f "$root/etc/glidein/factory.pub" ]; then
    echo "install.sh: no --pubkey: set GLIDEIN_PUBKEY_SHA256 in /etc/glidein/wrapper.conf instead" >&2
fi
if [ -n "$imagekey" ]; then
    grep -q "BEGIN PRIVATE KEY" "$imagekey" || { echo "install.sh: $imagekey is not a PEM private key" >&2; exit 2; }
    (umask 077 && cp "$imagekey" "$root/etc/glidein/userdata.key")
    chmod 0600 "$root/etc/glidein/userdata.key"
fi
if [ -n "$sources" ]; then
    printf 'GLIDEIN_USERDATA_SOURCES="%s"\n' "$sources" >"$root/etc/glidein/wrapper.conf"
fi
if [ "$enable" = yes ]; then
    mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
    ln -sf /etc/systemd/system/glidein-pilot.service "$root/etc/systemd/system/multi-user.target.wants/glidein-pilot.service"
fi
echo "glidein pilot installed under $root (wrapper $lib/glidein-wrapper.sh)"
