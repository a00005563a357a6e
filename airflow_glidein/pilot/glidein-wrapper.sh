#!/bin/sh
# glidein-wrapper.sh: baked into the VM image, started by glidein-pilot.service at boot.
#
# Finds the UserData envelope by middleware, checks the factory's Ed25519 signature, decrypts it if
# it is sealed (with the image's X25519 key), fetches the startup script from the bootstrap service,
# checks its SHA-256 against the envelope, runs it, then powers the VM off. Needs only sh and curl
# or wget (plus openssl 1.1.1+ or python3 to verify and decrypt).
#
# Usage: glidein-wrapper.sh [ENVELOPE_FILE [INSTANCE_ID]]   (a file and an id: grid pilots, glidein-grid-pilot.sh)
#
# Every place it looks can be overridden (the tests override all of them):
#   GLIDEIN_WRAPPER_CONF            sourced first if it exists (default /etc/glidein/wrapper.conf)
#   GLIDEIN_USERDATA_FILE           the envelope as a file (same as the first argument)
#   GLIDEIN_INSTANCE_ID             this pilot's instance id (else from the metadata source)
#   GLIDEIN_USERDATA_SOURCES        order to try (default: imdsv2 imdsv1 configdrive openstack opennebula)
#   GLIDEIN_IMDS_URL                EC2 instance metadata (default http://169.254.169.254)
#   GLIDEIN_CONFIG_DRIVE_DIR        a mounted OpenStack config drive (default: find label config-2, mount it)
#   GLIDEIN_OPENSTACK_METADATA_URL  (default http://169.254.169.254/openstack/latest)
#   GLIDEIN_ONE_CONTEXT             OpenNebula context.sh (default: the CONTEXT CD-ROM's, mounted)
#   GLIDEIN_PUBKEY_FILE             the factory's public key (default /etc/glidein/factory.pub); during a key
#                                   rotation also FILE.previous and GLIDEIN_PUBKEY_DIR/*.pub (default FILE.d):
#                                   the envelope names its key id and the wrapper checks it with that key
#   GLIDEIN_PUBKEY_SHA256           or: fetch it from the bootstrap service, pinned by these fingerprints
#                                   (space-separated: the current and the previous key's)
#   GLIDEIN_VERIFIER                auto | openssl | python3
#   GLIDEIN_USERDATA_KEY            the image's X25519 private key, for sealed envelopes (default /etc/glidein/userdata.key)
#   GLIDEIN_DECRYPTER               auto | openssl | python3 (default: as the verifier)
#   GLIDEIN_WORKDIR                 (default /var/lib/glidein)
#   GLIDEIN_POWEROFF_CMD            run at the end (default: systemctl poweroff || shutdown -h now || poweroff)
#   GLIDEIN_POWEROFF                no: power nothing off (a grid job on a worker node we did not build)
#   GLIDEIN_HTTP_CLIENT             curl | wget
#   GLIDEIN_CA_BUNDLE               CA certificates of a bootstrap service with a private CA (default /etc/glidein/ca.pem)
#
# On EC2 (UserData from IMDS) it also reads the signed instance identity document, which the exchange
# sends so the service can check the instance id this VM claims.
set -u
GLIDEIN_ME=glidein-wrapper
HERE=$(cd "$(dirname "$0")" && pwd)
CONF=${GLIDEIN_WRAPPER_CONF:-/etc/glidein/wrapper.conf}
# shellcheck disable=SC1090
[ -f "$CONF" ] && . "$CONF"
GLIDEIN_LIB=${GLIDEIN_LIB:-$HERE/glidein-lib.sh}
# shellcheck source=glidein-lib.sh
. "$GLIDEIN_LIB"

GLIDEIN_WORKDIR=${GLIDEIN_WORKDIR:-/var/lib/glidein}
WORK=$GLIDEIN_WORKDIR
umask 077
mkdir -p "$WORK" || exit 1
GLIDEIN_LOG=$WORK/glidein.log
: >"$GLIDEIN_LOG"
export GLIDEIN_LIB GLIDEIN_WORKDIR GLIDEIN_LOG
[ -n "${GLIDEIN_CA_BUNDLE:-}" ] && export GLIDEIN_CA_BUNDLE
IMDS=${GLIDEIN_IMDS_URL:-http://169.254.169.254}
OS_MD=${GLIDEIN_OPENSTACK_METADATA_URL:-http://169.254.169.254/openstack/latest}
PUBKEY=${GLIDEIN_PUBKEY_FILE:-/etc/glidein/factory.pub}
PUBKEY_DIR=${GLIDEIN_PUBKEY_DIR:-$PUBKEY.d}
KEY_ID=""
UDKEY=${GLIDEIN_USERDATA_KEY:-/etc/glidein/userdata.key}
UD=$WORK/userdata
BODY=$WORK/envelope
SIGNED=$BODY  # the bytes the signature covers: the body, or a sealed envelope's outer body
IID=""
GLIDEIN_URL=""
TOKEN=""

poweroff_vm() {
    if [ "${GLIDEIN_POWEROFF:-yes}" = no ]; then
        glidein_log "not powering anything off: this is a job on a machine that is not ours"
        return 0
    fi
    cmd=${GLIDEIN_POWEROFF_CMD:-systemctl poweroff || shutdown -h now || poweroff}
    glidein_log "powering off: $cmd"
    sh -c "$cmd"
}

# fail MESSAGE: say why, return the logs if we can (bootstrap token), power off.
fail() {
    glidein_log "STOP: $*"
    if [ -n "$GLIDEIN_URL" ] && [ -n "$TOKEN" ] && [ -n "$IID" ]; then
        export GLIDEIN_URL
        upload_log "$GLIDEIN_LOG" glidein.log "$TOKEN" "$IID"
    fi
    poweroff_vm
    exit 1
}

# -- where the UserData is -------------------------------------------------------------------
from_file() {
    [ -f "$1" ] || return 1
    cp "$1" "$UD"
    [ -n "${2:-}" ] && printf '%s\n' "$2" >"$WORK/instance-id"
    return 0
}

from_imdsv2() {
    [ "$(http PUT "$IMDS/latest/api/token" "$WORK/imds.token" "X-aws-ec2-metadata-token-ttl-seconds: 21600")" = 200 ] \
        || return 1
    h="X-aws-ec2-metadata-token: $(cat "$WORK/imds.token")"
    [ "$(http GET "$IMDS/latest/user-data" "$UD" "$h")" = 200 ] || return 1
    [ "$(http GET "$IMDS/latest/meta-data/instance-id" "$WORK/instance-id" "$h")" = 200 ] || return 1
    identity_document "$h"
}

from_imdsv1() {
    [ "$(http GET "$IMDS/latest/user-data" "$UD")" = 200 ] || return 1
    [ "$(http GET "$IMDS/latest/meta-data/instance-id" "$WORK/instance-id")" = 200 ] || return 1
    identity_document
}

# identity_document [HEADER]: EC2's signed instance identity document and its RSA-SHA256 signature, if served.
identity_document() {
    d=$IMDS/latest/dynamic/instance-identity
    if [ "$(http GET "$d/document" "$WORK/identity.json" ${1:+"$1"})" != 200 ] \
        || [ "$(http GET "$d/signature" "$WORK/identity.sig" ${1:+"$1"})" != 200 ]; then
        rm -f "$WORK/identity.json" "$WORK/identity.sig"
    fi
    return 0
}

json_uuid() {
    tr -d '\n' <"$1" | sed -n 's/.*"uuid"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p'
}

# mount_label LABEL DIR: mount the read-only device with that file-system label.
mount_label() {
    dev=$(blkid -L "$1" 2>/dev/null) || dev=""
    [ -z "$dev" ] && [ -e "/dev/disk/by-label/$1" ] && dev=/dev/disk/by-label/$1
    [ -n "$dev" ] || return 1
    mkdir -p "$2" && mount -o ro "$dev" "$2" 2>>"$GLIDEIN_LOG"
}

from_configdrive() {
    dir=${GLIDEIN_CONFIG_DRIVE_DIR:-}
    if [ -z "$dir" ]; then
        dir=$WORK/config-2
        mount_label config-2 "$dir" || return 1
    fi
    [ -f "$dir/openstack/latest/user_data" ] || return 1
    cp "$dir/openstack/latest/user_data" "$UD"
    json_uuid "$dir/openstack/latest/meta_data.json" >"$WORK/instance-id"
}

from_openstack() {
    [ "$(http GET "$OS_MD/user_data" "$UD")" = 200 ] || return 1
    [ "$(http GET "$OS_MD/meta_data.json" "$WORK/meta_data.json")" = 200 ] || return 1
    json_uuid "$WORK/meta_data.json" >"$WORK/instance-id"
}

one_var() {
    sed -n "s/^$1='\\(.*\\)'\$/\\1/p" "$2" | head -n 1
}

# OpenNebula: the envelope is the CONTEXT variable USER_DATA (USERDATA_ENCODING=base64), the VM id VMID.
from_opennebula() {
    ctx=${GLIDEIN_ONE_CONTEXT:-}
    if [ -z "$ctx" ]; then
        mount_label CONTEXT "$WORK/context" || return 1
        ctx=$WORK/context/context.sh
    fi
    [ -f "$ctx" ] || return 1
    data=$(one_var USER_DATA "$ctx")
    [ -n "$data" ] || return 1
    if [ "$(one_var USERDATA_ENCODING "$ctx")" = base64 ]; then
        printf '%s' "$data" | b64d >"$UD" || return 1
    else
        printf '%s\n' "$data" >"$UD"
    fi
    one_var VMID "$ctx" >"$WORK/instance-id"
}

find_userdata() {
    file=${1:-${GLIDEIN_USERDATA_FILE:-}}
    if [ -n "$file" ]; then
        from_file "$file" "${2:-}" || fail "envelope file $file not found"
        glidein_log "UserData from file $file"
        return 0
    fi
    for src in ${GLIDEIN_USERDATA_SOURCES:-imdsv2 imdsv1 configdrive openstack opennebula}; do
        rm -f "$UD" "$WORK/instance-id"
        if "from_$src" && [ -s "$UD" ]; then
            glidein_log "UserData from $src"
            return 0
        fi
        glidein_log "no UserData from $src"
    done
    fail "no UserData found (tried: ${GLIDEIN_USERDATA_SOURCES:-imdsv2 imdsv1 configdrive openstack opennebula})"
}

# -- the signature ---------------------------------------------------------------------------
openssl_ed25519() {
    case "$(openssl version 2>/dev/null)" in
        "OpenSSL 1.1.1"* | "OpenSSL 3."* | "OpenSSL 4."*) return 0 ;;
    esac
    return 1
}

# pick_tool CHOICE WHAT: openssl 1.1.1+ or python3, as CHOICE (auto | openssl | python3) says.
pick_tool() {
    case "$1" in
        openssl | python3) printf '%s\n' "$1" ;;
        auto)
            if command -v openssl >/dev/null 2>&1 && openssl_ed25519; then
                echo openssl
            elif command -v python3 >/dev/null 2>&1; then
                echo python3
            else
                fail "cannot $2: neither openssl 1.1.1+ nor python3 is installed"
            fi ;;
        *) fail "unknown tool $1 to $2 (use openssl or python3)" ;;
    esac
}

# tool_name TOOL: what the log says was used.
tool_name() {
    if [ "$1" = openssl ]; then echo "openssl ($(openssl version | cut -d' ' -f1-2))"; else echo "$1"; fi
}

# key_id TOOL FILE: the id an envelope names a factory key by: the first 16 hex digits of SHA-256
# over the raw 32-byte Ed25519 public key (airflow_glidein/userdata.py); nothing if FILE is no such key.
key_id() {
    case "$1" in
        openssl)
            openssl pkey -pubin -in "$2" -outform DER 2>>"$GLIDEIN_LOG" | tail -c 32 >"$WORK/key.raw"
            [ -s "$WORK/key.raw" ] && sha256 "$WORK/key.raw" | cut -c 1-16
            rm -f "$WORK/key.raw" ;;
        python3) python3 "$HERE/ed25519_verify.py" keyid "$2" 2>>"$GLIDEIN_LOG" ;;
    esac
}

# hex16 VALUE: succeeds when VALUE is 16 lower-case hex digits (a key id).
hex16() {
    case "$1" in *[!0-9a-f]*) return 1 ;; esac
    [ ${#1} -eq 16 ]
}

# has_pubkey: succeeds when the image carries a factory key (current, previous or in the directory).
has_pubkey() {
    for f in "$PUBKEY" "$PUBKEY.previous" "$PUBKEY_DIR"/*.pub; do
        [ -f "$f" ] && return 0
    done
    return 1
}

# pick_pubkey TOOL: point PUBKEY at the carried factory key whose id the envelope names, or stop naming both ids.
pick_pubkey() {
    have=""
    for f in "$PUBKEY" "$PUBKEY.previous" "$PUBKEY_DIR"/*.pub; do
        [ -f "$f" ] || continue
        id=$(key_id "$1" "$f")
        if [ -n "$id" ] && [ "$id" = "$KEY_ID" ]; then
            PUBKEY=$f
            return 0
        fi
        have="$have${have:+, }${id:-no Ed25519 key} ($f)"
    done
    fail "the envelope is signed with factory key id $KEY_ID, but this image carries key id ${have:-none} (read with $(tool_name "$1")): bake the factory's current key (python -m airflow_glidein pubkey) into it; refusing to run anything"
}

verify_signature() {
    verifier=$(pick_tool "${GLIDEIN_VERIFIER:-auto}" "verify the envelope") || exit 1
    if [ -n "$KEY_ID" ]; then
        pick_pubkey "$verifier"
    else
        glidein_log "the envelope names no key id (a factory from before key rotation): checking it with $PUBKEY"
    fi
    case "$verifier" in
        openssl)
            openssl pkeyutl -verify -pubin -inkey "$PUBKEY" -rawin -in "$SIGNED" -sigfile "$WORK/envelope.sig" \
                >>"$GLIDEIN_LOG" 2>&1 ;;
        python3)
            python3 "$HERE/ed25519_verify.py" "$PUBKEY" "$SIGNED" "$WORK/envelope.sig" >>"$GLIDEIN_LOG" 2>&1 ;;
    esac
    ok=$?
    [ $ok -eq 0 ] || fail "envelope signature does not verify with the factory key $PUBKEY (checked with $verifier); refusing to run anything"
    glidein_log "envelope signature verified with $(tool_name "$verifier"), factory key ${KEY_ID:+id $KEY_ID }$PUBKEY"
}

# -- a sealed envelope: X25519 + PBKDF2-HMAC-SHA256 + ChaCha20 (see airflow_glidein/userdata.py) ----
# Secrets go through mode-600 files in $WORK, never on a command line (any user can read those).
open_envelope() {
    want=$(val recipient "$SIGNED")
    alg=$(val sealed "$SIGNED")
    [ "$alg" = x25519-pbkdf2-sha256-chacha20 ] || fail "unknown envelope encryption '$alg'"
    [ -f "$UDKEY" ] || fail "the envelope is encrypted for the image key sha256:$want, but this image has no private key at $UDKEY: bake it in (docker/vm-image/README.md) or launch this entry without encrypt_userdata"
    [ -r "$UDKEY" ] || fail "cannot read the image key $UDKEY (the wrapper runs as root)"
    [ -n "$(find "$UDKEY" -perm -004 2>/dev/null)" ] \
        && glidein_log "warning: $UDKEY is world-readable; any user of this VM can decrypt its UserData (chmod 600 it)"
    tool=$(pick_tool "${GLIDEIN_DECRYPTER:-${GLIDEIN_VERIFIER:-auto}}" "decrypt the envelope") || exit 1
    val epk "$SIGNED" | b64d >"$WORK/epk.der" 2>>"$GLIDEIN_LOG" || fail "sealed envelope: ephemeral key is not base64"
    val ct "$SIGNED" | b64d >"$WORK/ct.bin" 2>>"$GLIDEIN_LOG" || fail "sealed envelope: ciphertext is not base64"
    case "$tool" in
        openssl)
            got=$(openssl pkey -in "$UDKEY" -pubout -outform DER 2>>"$GLIDEIN_LOG" >"$WORK/image.pub" && sha256 "$WORK/image.pub") ;;
        python3)
            got=$(python3 "$HERE/x25519_open.py" fingerprint "$UDKEY" 2>>"$GLIDEIN_LOG") ;;
    esac
    [ -n "$got" ] || fail "cannot read the image key $UDKEY with $(tool_name "$tool") (an X25519 PEM private key?)"
    [ "$got" = "$want" ] || fail "the envelope is encrypted for the image key sha256:$want, but $UDKEY is sha256:$got (checked with $(tool_name "$tool")): this image was baked with another key"
    case "$tool" in
        openssl)
            openssl pkeyutl -derive -inkey "$UDKEY" -peerkey "$WORK/epk.der" -peerform DER -out "$WORK/ecdh.bin" \
                >>"$GLIDEIN_LOG" 2>&1 \
            && { od -An -v -tx1 "$WORK/ecdh.bin" | tr -d ' \n'; echo; } >"$WORK/ecdh.pass" \
            && openssl enc -d -chacha20 -pbkdf2 -iter 1 -md sha256 -pass "file:$WORK/ecdh.pass" \
                -in "$WORK/ct.bin" -out "$BODY" >>"$GLIDEIN_LOG" 2>&1 ;;
        python3)
            python3 "$HERE/x25519_open.py" open "$UDKEY" "$WORK/epk.der" "$WORK/ct.bin" "$BODY" >>"$GLIDEIN_LOG" 2>&1 ;;
    esac
    ok=$?
    rm -f "$WORK/ecdh.bin" "$WORK/ecdh.pass"
    [ $ok -eq 0 ] || fail "cannot decrypt the envelope with $(tool_name "$tool")"
    [ "$(val v "$BODY")" = 1 ] && [ -n "$(val token "$BODY")" ] \
        || fail "the envelope decrypted with $(tool_name "$tool") to no envelope body"
    glidein_log "envelope decrypted with $(tool_name "$tool") (image key sha256:$got)"
}

# -- main --------------------------------------------------------------------------------------
find_userdata "$@"
SEALED=no
case "$(sed -n 1p "$UD" | tr -d '\r')" in
    "#glidein-envelope v1") ;;
    "#glidein-envelope v1 sealed") SEALED=yes SIGNED=$WORK/sealed ;;
    *) fail "UserData is not a glidein envelope v1" ;;
esac
sed -n 2p "$UD" | b64d >"$SIGNED" 2>>"$GLIDEIN_LOG" || fail "envelope body is not base64"
sed -n 3p "$UD" | b64d >"$WORK/envelope.sig" 2>>"$GLIDEIN_LOG" || fail "envelope signature is not base64"
IID=${GLIDEIN_INSTANCE_ID:-$(cat "$WORK/instance-id" 2>/dev/null)}
safe_id "$IID" || { IID=""; fail "no usable instance id (got '$(cat "$WORK/instance-id" 2>/dev/null)')"; }

KEY_ID=$(val key_id "$SIGNED")
[ -z "$KEY_ID" ] || hex16 "$KEY_ID" || fail "the envelope's key id is not 16 hex digits; refusing to run anything"
if ! has_pubkey; then
    pins=${GLIDEIN_PUBKEY_SHA256:-}
    [ -n "$pins" ] || fail "no factory public key: bake it into $PUBKEY or set GLIDEIN_PUBKEY_SHA256"
    url=$(val bootstrap_url "$SIGNED")
    path=pubkey.pem
    [ -n "$KEY_ID" ] && path=pubkeys/$KEY_ID.pem
    PUBKEY=$WORK/factory.pub
    [ "$(http GET "$url/bootstrap/$path" "$PUBKEY")" = 200 ] || fail "cannot fetch the factory public key from $url/bootstrap/$path"
    got=$(sha256 "$PUBKEY")
    case " $pins " in
        *" $got "*) glidein_log "factory public key fetched from $url, its fingerprint $got is pinned" ;;
        *) fail "the public key served by $url does not match the pinned fingerprint $pins" ;;
    esac
fi
verify_signature

# Trusted from here on.
if [ "$SEALED" = yes ]; then
    # the clear log-only token sends this log home if decryption fails
    GLIDEIN_URL=$(val bootstrap_url "$SIGNED")
    TOKEN=$(val log_token "$SIGNED")
    open_envelope
fi
GLIDEIN_URL=$(val bootstrap_url "$BODY")
TOKEN=$(val token "$BODY")
export GLIDEIN_URL
if [ -s "$WORK/identity.json" ] && [ -s "$WORK/identity.sig" ]; then
    # the exchange's body: what lets the service check the instance id we claim
    {
        printf 'identity_document='; b64e <"$WORK/identity.json"; echo
        printf 'identity_signature='; tr -d '\r\n' <"$WORK/identity.sig"; echo
    } >"$WORK/identity"
    GLIDEIN_IDENTITY=$WORK/identity
    export GLIDEIN_IDENTITY
    glidein_log "the exchange will carry EC2's signed instance identity document"
fi
glidein_log "pilot $IID: launch $(val launch_id "$BODY"), entry $(val entry "$BODY"), frontend $(val frontend "$BODY"), factory $(val factory "$BODY")"
now=$(date +%s)
expires=$(val token_expires "$BODY")
[ "$now" -le "${expires:-0}" ] || glidein_log "warning: the bootstrap token expired $((now - ${expires:-0})) s ago; the exchange will be refused"

SCRIPT=$WORK/glidein-startup.sh
code=$(http GET "$GLIDEIN_URL/bootstrap/startup.sh" "$SCRIPT")
[ "$code" = 200 ] || fail "cannot fetch the startup script from $GLIDEIN_URL (HTTP $code)"
want=$(val script_sha256 "$BODY")
got=$(sha256 "$SCRIPT")
[ "$got" = "$want" ] || fail "startup script hash mismatch: the envelope says $want, the fetched script has $got; not running it"
glidein_log "startup script $got checked; running it"

# A stop (systemctl stop, shutdown) signals every process of the unit: the startup script stops
# condor_master and uploads the logs; we wait for it, then power off.
trap 'glidein_log "signal received: waiting for the startup script to finish"' TERM INT HUP
GLIDEIN_ENVELOPE=$BODY GLIDEIN_INSTANCE_ID=$IID sh "$SCRIPT"
rc=$?
glidein_log "startup script ended with status $rc"
poweroff_vm
exit $rc
